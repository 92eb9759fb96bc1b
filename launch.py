"""Runs one job from a config file.

  python launch.py --config=configs/student.py [--workdir=workdirs/student] [--config.a.b=value]

The same command runs on one CPU, a GPU host or every worker of a TPU VM slice
(`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python launch.py ..."`). The job is
`config.trainer`; its `train_and_evaluate(config, workdir)` does the work and resumes from
<workdir>/checkpoints when they exist.

Errors: a user's mistake (an unknown config key or name, a missing path, a bad scale, a batch
not divisible by the devices, an unwritable workdir, no images, all checkpoints damaged, ...) is
one line `error: ...` on stderr and exit status 2. Such errors are the ValueError,
FileNotFoundError, PermissionError, KeyError and AttributeError that this repository's own code
raises (the raise is in sr_purify/, configs/ or launch.py), plus an unknown `--config.` key.
Anything else, and those types when raised inside JAX, Flax, orbax or any other library, is a
bug or an environment problem: its full traceback goes to stderr and to <workdir>/error.log
(error.process_<i>.log on process i > 0) when the workdir exists, and the exit status is 1.
"""

import logging as py_logging
import os
import sys
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's C++ INFO lines are noise here.

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Job config file (configs/*.py[:variant]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, logs and results go. Default: workdirs/<config>.'
)
_MULTIHOST = flags.DEFINE_bool(
    'multihost',
    None,
    'Call jax.distributed.initialize() (default: when the environment '
    'names a coordinator, e.g. on a TPU VM slice or under SLURM).',
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0, for a multi-process run started by '
    'hand (e.g. several GPU hosts, or CPU processes on one host).',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a run started by hand.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process in a run started by hand.')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str) -> str:
    name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
    return os.path.join('workdirs', name)


class _QuietLibraries(py_logging.Filter):
    """Drops INFO lines from orbax and tfds internals; warnings and errors still show."""

    def filter(self, record):
        noisy = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/')
        return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in noisy)


def _wants_distributed() -> bool:
    if _COORDINATOR.value:
        return True
    if _MULTIHOST.value is not None:
        return _MULTIHOST.value
    return any(
        k in os.environ
        for k in (
            'JAX_COORDINATOR_ADDRESS',
            'TPU_WORKER_HOSTNAMES',
            'SLURM_JOB_ID',
            'OMPI_COMM_WORLD_SIZE',
        )
    )


def missing_checkpoint(config, where: str = 'config') -> str:
    """A message for the first `checkpoint` / `*_checkpoint` field that names a local path that
    does not exist, or ''. Checked before TensorFlow and JAX load (seconds), so a mistyped path
    fails at once; remote paths (gs://...) are left to orbax."""
    items = (
        config.items()
        if hasattr(config, 'items')
        else enumerate(config)
        if isinstance(config, (list, tuple))
        else ()
    )
    for key, value in items:
        name = f'{where}[{key}]' if isinstance(key, int) else f'{where}.{key}'
        is_path_field = isinstance(key, str) and (
            key == 'checkpoint' or key.endswith('_checkpoint')
        )
        if is_path_field and isinstance(value, str) and value and '://' not in value:
            if not os.path.exists(value):
                return (
                    f'{name}={value!r} does not exist; pass the workdir of a finished job '
                    f'(or its checkpoints/ folder): --{name}=<path>'
                )
        elif not isinstance(value, str):
            found = missing_checkpoint(value, name)
            if found:
                return found
    return ''


_RUN = {'workdir': None}  # Set by main, read by handle_error to place error.log.


VERIFY_FLAGS = {
    'checkpoint': 'the workdir of a student or teacher job',
    'owner': 'the workdir of configs/watermark.py',
    'suspect': "a model folder, or a folder of its outputs on the owner's probes",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config = _CONFIG.value
    problem = missing_checkpoint(config)
    if problem:
        raise FileNotFoundError(problem)
    if config.trainer in ('upscale', 'export') and not config.checkpoint:
        raise FileNotFoundError(
            "no model given; pass --config.checkpoint=<a student or teacher job's workdir"
            + (', or an export folder>' if config.trainer == 'upscale' else '>')
        )
    if config.trainer == 'extract':  # The victim is required and has no default.
        victim = config.victim
        if not victim or ('://' not in victim and not os.path.exists(victim)):
            raise FileNotFoundError(
                (f'--config.victim={victim!r} does not exist' if victim else 'no victim given')
                + '; pass --config.victim=<a teacher or student workdir, or an export folder>'
            )
    if config.trainer in ('watermark', 'verify'):  # Required folders, checked before TF loads.
        required = {'watermark': ('checkpoint',), 'verify': ('owner', 'suspect')}[config.trainer]
        for flag in required:
            value = config[flag]
            if not value or ('://' not in value and not os.path.exists(value)):
                raise FileNotFoundError(
                    (f'--config.{flag}={value!r} does not exist' if value else f'no {flag} given')
                    + f'; pass --config.{flag}=<{VERIFY_FLAGS[flag]}>'
                )
    if config.trainer == 'upscale':  # No images is an error at once, before TensorFlow loads.
        if not config.input:
            raise FileNotFoundError(
                'no images given; pass --config.input=<an image file, a folder or a glob>'
            )
        from sr_purify import inference

        inference.list_inputs(config.input)
    # TensorFlow only feeds data: keep it off the accelerators JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None

    # Orbax logs every file it writes at INFO; keep the job's own log readable.
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from sr_purify import perf, purifiers

    if purifiers.uses_host_callbacks(config):
        perf.reserve_callback_thread()  # Before JAX's backend starts: see its docstring.
    import jax

    if _wants_distributed():
        # On TPU VMs and SLURM jax finds the coordinator itself; by hand, the flags name it.
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from sr_purify import jobs

    train_and_evaluate = jobs.get(config.trainer)
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
    _RUN['workdir'] = workdir
    logging.info(
        'process %d of %d; %d local / %d global devices (%s)',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    logging.info('job %s, workdir %s', config.trainer, workdir)
    result = train_and_evaluate(config, workdir)
    if getattr(result, 'preempted', False):
        print(
            f'stopped by signal at step {result.step}; checkpoint saved in {workdir}. '
            f'Run the same command to resume.',
            flush=True,
        )
    else:
        print(f'done: results in {os.path.join(workdir, "results.json")}', flush=True)


def unknown_override(argv) -> str:
    """For `--config.a.b=v` overrides, a message naming the first key the config lacks, or ''."""
    import importlib.util

    spec_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec_arg is None:
        return ''
    path, _, variant = spec_arg.partition(':')
    spec = importlib.util.spec_from_file_location('job_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or None)
    for a in argv:
        if not a.startswith('--config.'):
            continue
        keys = a[len('--config.') :].split('=', 1)[0].split('.')
        node, seen = config, []
        for k in keys:
            if not hasattr(node, 'keys') or k not in node:
                where = '.'.join(seen) or 'the config'
                valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(a leaf)'
                return (
                    f'unknown config key {".".join(keys)!r}: {where} has no {k!r}; valid: {valid}'
                )
            node, seen = node[k], seen + [k]
    return ''


_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, KeyError, AttributeError)
_REPO = os.path.dirname(os.path.abspath(__file__))
_OWN_CODE = (os.path.join(_REPO, 'sr_purify') + os.sep, os.path.join(_REPO, 'configs') + os.sep)


def _raised_by_own_code(e: BaseException) -> bool:
    """Whether the innermost frame of `e`'s traceback, where it was raised, is this repository's
    sr_purify/, configs/ or launch.py. Those raises are the deliberate, user-facing ones; the
    same types from inside a library are bugs whose traceback is the only clue."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    filename = os.path.abspath(frames[-1].filename)
    return filename.startswith(_OWN_CODE) or filename == os.path.abspath(__file__)


def _process_index() -> int:
    jax = sys.modules.get('jax')
    try:
        return jax.process_index() if jax is not None else 0
    except Exception:  # The backend itself may be what failed.
        return 0


def handle_error(e: BaseException, workdir: str = '') -> int:
    """Reports an exception that ended the job; returns the exit status (see the docstring)."""
    py_logging.getLogger().handlers.clear()  # No absl log lines after the error.
    if isinstance(e, (AttributeError, KeyError)):
        message = unknown_override(sys.argv)  # ml_collections raises these for a mistyped key.
        if message:
            print(f'error: {message}', file=sys.stderr)
            return 2
    if isinstance(e, _USER_ERRORS) and _raised_by_own_code(e):
        # A KeyError's str() is its message quoted; any other message may start with a quote.
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f'error: {message}', file=sys.stderr)
        return 2
    text = ''.join(traceback.format_exception(e))
    print(text, file=sys.stderr, end='')
    workdir = workdir or _RUN['workdir']
    if workdir:
        from sr_purify import paths

        index = _process_index()
        name = 'error.log' if index == 0 else f'error.process_{index}.log'
        try:
            if paths.path(workdir).is_dir():
                (paths.path(workdir) / name).write_text(text)
                print(f'(this traceback is also in {paths.join(workdir, name)})', file=sys.stderr)
        except Exception:  # An unwritable workdir (or store) must not hide the error itself.
            pass
    return 1


def run():
    # CPU-only and no XLA_FLAGS of the user's: the measured allocator and host-device settings
    # (sr_purify/perf.py; about 1.6x faster SR training on 2 cores). May restart the process once.
    from sr_purify import perf

    perf.apply_cpu_defaults()
    try:
        app.run(main)
    except Exception as e:
        sys.exit(handle_error(e))


if __name__ == '__main__':
    run()
