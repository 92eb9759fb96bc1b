"""CPU settings that make this project's small-batch conv nets faster under XLA (bench/sr_speed.py).

Import this module before jax: it imports no jax. `apply_cpu_defaults()` is meant for the top of
an entry point; on a CPU-only run with no XLA_FLAGS of the user's it

* restarts the process once with ALLOCATOR_ENV: XLA allocates every step's buffers anew, and
  glibc serves the big ones with fresh mmaps (worker threads' arenas fall back to mmap whatever
  M_MMAP_THRESHOLD says), so each step page-faults every 4 KiB it touches: 183k faults per
  EDSR-baseline train step (batch 16 of 48x48), about a third of its time on this 2-core VM.
  One arena that never returns memory makes it 0 faults per step;
* splits the data-parallel mesh over `devices` host devices: this jaxlib runs each convolution on
  one thread at these sizes, and two devices run the two halves of the batch side by side.

Measured and left out (bench/sr_speed.py, 2-core AMD EPYC): `--xla_cpu_experimental_ynn_fusion_type`
`=dot,eltwise` (no gain in training, inference twice the CPU time), `-individual_convolution`
(convolutions off YNNPACK: 5-30 % more CPU time), oneDNN/XNNPACK flags (no convolution reaches
them), and 3x3 convolutions as one matmul over patches (`sr_purify.models.layers`, about 2x the
CPU time: XLA's patch building costs more than the dot saves).
"""

import dataclasses
import importlib.util
import logging
import os
import sys

ALLOCATOR_ENV = {
    'MALLOC_ARENA_MAX': '1',  # every thread allocates from the main (brk) heap,
    'MALLOC_MMAP_MAX_': '0',  # never from a fresh mmap,
    'MALLOC_TRIM_THRESHOLD_': str(1 << 40),  # and freed memory stays mapped for the next step.
}


@dataclasses.dataclass(frozen=True)
class CpuSettings:
    xla_flags: str  # for XLA_FLAGS (device count excluded)
    devices: int  # host devices for the data-parallel mesh (1: no split)


def cpu_settings(cores: int = 0) -> CpuSettings:
    """The best settings measured for training and inference on a small CPU host."""
    cores = cores or os.cpu_count() or 1
    return CpuSettings(xla_flags='', devices=2 if cores >= 2 else 1)


def xla_flags(settings: CpuSettings) -> str:
    flags = settings.xla_flags
    if settings.devices > 1:
        flags = f'{flags} --xla_force_host_platform_device_count={settings.devices}'
    return flags.strip()


def cpu_only() -> bool:
    """True if JAX runs on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin exists."""
    platforms = os.environ.get('JAX_PLATFORMS', '')
    if platforms:
        return platforms.split(',')[0].strip() == 'cpu'
    plugins = (
        'jax_plugins.xla_cuda12',
        'jax_plugins.xla_cuda13',
        'jax_plugins.xla_rocm',
        'jax_cuda12_plugin',
        'jax_cuda13_plugin',
        'libtpu',
    )
    for name in plugins:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except ModuleNotFoundError:  # A parent package is missing.
            continue
    return True


def host_devices() -> int:
    """Host (CPU) devices that XLA_FLAGS asks for; 1 when it names none."""
    for flag in os.environ.get('XLA_FLAGS', '').split():
        if flag.startswith('--xla_force_host_platform_device_count='):
            return int(flag.split('=', 1)[1])
    return 1


def reserve_callback_thread() -> bool:
    """Gives XLA's CPU thread pool one thread more than the host devices (PJRT_NPROC).

    For jobs with host callbacks (the jpeg purifier): under a multi-device CPU mesh each device's
    callback blocks a pool thread, and with 2 devices on 2 cores nothing is left to run it, so the
    job hangs (every try, bench/robustness.py). The extra thread costs about 15 % on the conv-heavy
    training step, so only jobs that need it ask. Must run before JAX's backend starts; does
    nothing if PJRT_NPROC is set or the run is not CPU-only.
    """
    devices = host_devices()
    if 'PJRT_NPROC' in os.environ or not cpu_only() or devices < 2:
        return False
    if 'jax' in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():  # Too late to size the pool.
            logging.warning(
                'JAX already started: host callbacks on %d CPU devices may hang; '
                'set PJRT_NPROC=%d before starting',
                devices,
                devices + 1,
            )
            return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if (cores or 1) > devices:
        return False
    os.environ['PJRT_NPROC'] = str(devices + 1)
    return True


def reexec_with_allocator_env() -> None:
    """Restarts this process with ALLOCATOR_ENV if any of it is unset (glibc reads it at start)."""
    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing and sys.platform.startswith('linux'):
        sys.stdout.flush()
        sys.stderr.flush()
        argv = getattr(sys, 'orig_argv', None) or [sys.executable] + sys.argv  # orig_argv: 3.10+
        os.execve(sys.executable, [sys.executable] + list(argv[1:]), {**os.environ, **missing})


def apply_cpu_defaults(force: bool = False) -> bool:
    """Applies `cpu_settings()` to this process; call before jax (or TensorFlow) is imported.

    Does nothing (returns False) unless `force`, or the run is CPU-only and XLA_FLAGS is unset,
    so a user's own flags and the tests' fake devices always win. May restart the process once.
    """
    if not force and ('XLA_FLAGS' in os.environ or not cpu_only()):
        return False
    if 'jax' in sys.modules:
        raise RuntimeError('apply_cpu_defaults() must run before jax is imported')
    reexec_with_allocator_env()
    flags = f'{os.environ.get("XLA_FLAGS", "")} {xla_flags(cpu_settings())}'
    os.environ['XLA_FLAGS'] = flags.strip()
    return True
