"""Measuring tools, apart from the training path: they import it, it never imports them.

bench (scripts/bench.py), commbench (scripts/comm_bench.py), profile (scripts/profile_step.py);
common holds what they share.
"""
