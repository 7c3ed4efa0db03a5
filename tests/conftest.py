"""Test set-up: 4 simulated CPU devices (before JAX starts) and the project root on the path."""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
jax.config.update('jax_num_cpu_devices', 4)
