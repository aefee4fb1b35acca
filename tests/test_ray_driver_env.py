"""The Ray driver's own environment: Ray Train's controller poll interval (unit)."""

from accel_tp.env import RAY_POLL_ENV, ray_driver_env


def test_the_controller_polls_every_0_2_s_unless_the_user_set_an_interval() -> None:
    # Ray Train 2.60's default, 2 s, held a run that logs every step to one step per 2 s.
    assert ray_driver_env({}) == {RAY_POLL_ENV: "0.2"}
    assert ray_driver_env({RAY_POLL_ENV: "5"}) == {RAY_POLL_ENV: "5"}


def test_ray_train_reads_the_interval_from_the_driver_environment() -> None:
    # The controller actor gets RAY_TRAIN_* variables from the driver process (what launch sets).
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == RAY_POLL_ENV
    assert RAY_POLL_ENV in ENV_VARS_TO_PROPAGATE
