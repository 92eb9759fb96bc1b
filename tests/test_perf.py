"""sr_purify.perf: the CPU defaults launch.py applies before JAX starts."""

import os
import subprocess
import sys

from sr_purify import perf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    'import os, sys; from sr_purify import perf; applied = perf.apply_cpu_defaults(); '
    'import jax; print(applied, jax.device_count(), os.environ.get("MALLOC_ARENA_MAX"), '
    'os.environ.get("XLA_FLAGS", ""), sep="|")'
)


def probe(env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', *perf.ALLOCATOR_ENV)}
    env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **env_changes)
    out = subprocess.run(
        [sys.executable, '-c', PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1].split('|')


def test_cpu_defaults_apply_when_the_user_set_no_xla_flags():
    applied, devices, arena, flags = probe({})
    expected = perf.cpu_settings()
    assert applied == 'True'
    assert int(devices) == expected.devices
    assert arena == perf.ALLOCATOR_ENV['MALLOC_ARENA_MAX']  # The process restarted with it.
    assert flags == perf.xla_flags(expected)


def test_user_xla_flags_win():
    applied, devices, arena, flags = probe(
        {'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
    )
    assert (applied, devices, arena) == ('False', '3', 'None')
    assert flags == '--xla_force_host_platform_device_count=3'


def test_settings_follow_the_core_count():
    # The flags for 2 cores give JAX 2 host devices; those for 1 core leave it at 1.
    for cores, expected in ((2, '2'), (1, '1')):
        flags = perf.xla_flags(perf.cpu_settings(cores=cores))
        applied, devices, _, seen = probe({'XLA_FLAGS': flags})
        assert (applied, devices, seen) == ('False', expected, flags), cores


JPEG_PROBE = """
import os
# Two cores on any host, before the reservation reads the core count: the case that hangs.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
from sr_purify import perf, purifiers, sharding
import jax, jax.numpy as jnp, ml_collections, numpy as np
print('reserved', perf.reserve_callback_thread(), os.environ.get('PJRT_NPROC'))
mesh = sharding.make_mesh()
p = purifiers.build(ml_collections.ConfigDict(dict(kind='jpeg', jpeg_quality=75)), mesh)
x = sharding.to_global(np.random.default_rng(0).random((96, 32, 32, 3), np.float32), mesh)
loss = lambda x: jnp.sum(p.purify({}, x, jax.random.key(0)) ** 2)
for _ in range(3):  # Forward and the BPDA backward, as the adaptive attacker runs them.
    jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(x))
print('done')
"""


def test_jpeg_purifier_on_two_host_devices_does_not_hang():
    # Without the reserved thread this hangs on 2 devices and 2 cores (each device's host
    # callback holds one of XLA's pool threads); the timeout turns a hang into a failure.
    env = {k: v for k, v in os.environ.items() if k != 'PJRT_NPROC'}
    env.update(
        JAX_PLATFORMS='cpu', PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=2'
    )
    out = subprocess.run(
        [sys.executable, '-c', JPEG_PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip().endswith('done')
    assert 'reserved True 3' in out.splitlines()


def test_only_host_callback_jobs_reserve_a_thread():
    from configs import evaluate as evaluate_config
    from configs import purifier as purifier_config
    from sr_purify import purifiers

    assert purifiers.uses_host_callbacks(evaluate_config.get_config('robustness'))
    assert not purifiers.uses_host_callbacks(purifier_config.get_config('nrp'))
    assert not purifiers.uses_host_callbacks(evaluate_config.get_config('attack'))
