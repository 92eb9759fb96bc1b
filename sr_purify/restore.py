"""The one way from a finished job's folder to a usable model: `load(path) -> Restored`.

`path` is a teacher, student, classifier or purifier job's workdir, one of its checkpoint folders
(`checkpoints/`, a student job's `student/` export, a purifier job's `purifier/` export), or an
exported model folder. The architecture comes from the `config.json` the job wrote beside its
checkpoints, so nobody retypes it; the parameters come from the newest valid checkpoint (digest
verified, damaged steps skipped). Errors say what to pass:

* a path that does not exist, or holds no checkpoint: FileNotFoundError naming the flag;
* a job of another kind than the caller needs (a classifier where an SR model is expected, an
  evaluate job's workdir): ValueError naming both;
* parameters that do not fit the architecture: CheckpointMismatchError naming the parameter.

A job's saved config records its kind: `trainer` is the job ('teacher', 'student', ...), and the
student job keeps one field group per architecture under `model` (see models.flatten_config).
"""

import dataclasses
import json
from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sr_purify import checkpointing, models, paths, watermark

# What each job's workdir holds: the kind of model, and the subfolder its deliverable is in
# ('' = the training checkpoints, whose state['params'] are the model's).
JOB_KINDS = {'teacher': 'sr', 'student': 'sr', 'classifier': 'classifier', 'purifier': 'purifier'}
JOB_KINDS['extract'] = 'sr'  # The extraction job's surrogates/<name>_q<n> folders.
# A watermark job's folder: the marked model (its source's parameters, every output marked).
JOB_KINDS['watermark'] = 'sr'
EXPORT_FOLDERS = {'student': 'student', 'purifier': 'purifier'}
KINDS = ('sr', 'classifier', 'purifier')
CONFIG_FILE = 'config.json'


@dataclasses.dataclass(frozen=True)
class Restored:
    """A trained model as `module.apply(variables, x)` takes it.

    Attributes:
      kind: 'sr', 'classifier' or 'purifier'.
      job: the job that wrote it ('teacher', 'student', ...; '' when there was no config.json).
      module: the flax module (for a purifier its network; None for kinds without parameters).
      variables: {'params': ..., and e.g. 'batch_stats'} as numpy arrays.
      model_config: the flat model config `models.build` took (`scale` for SR models).
      config: the job's whole saved config (empty when there was none).
      step: the checkpoint step.
      directory: the checkpoint folder the parameters came from.
    """

    kind: str
    job: str
    module: Optional[nn.Module]
    variables: dict
    model_config: Optional[ml_collections.ConfigDict]
    config: ml_collections.ConfigDict
    step: int
    directory: str

    @property
    def params(self) -> Any:
        return self.variables.get('params', {})

    @property
    def scale(self) -> int:
        return int(self.model_config.scale)

    def apply(self, x: jax.Array, **kwargs) -> jax.Array:
        """The model on a batch (classifiers in inference mode)."""
        if self.kind == 'classifier':
            kwargs.setdefault('train', False)
        return self.module.apply(self.variables, x, **kwargs)


WHAT = {'sr': 'SR model', 'classifier': 'classifier', 'purifier': 'purifier', None: 'model'}


def _missing(path: str, flag: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f'no {what} checkpoint in {path!r}; pass {flag}=<the workdir of a finished {what} job '
        f'(or its checkpoints/ folder)>'
    )


def find_job_config(path: str) -> Tuple[Optional[ml_collections.ConfigDict], str]:
    """(the saved config, the job's workdir) for `path` or the folder above it; (None, path)."""
    path = str(paths.path(path))
    for folder in (path, paths.parent(path)):
        file = paths.path(folder) / CONFIG_FILE
        if file.is_file():
            return ml_collections.ConfigDict(json.loads(file.read_text())), folder
    return None, path


def job_kind(config: Optional[ml_collections.ConfigDict]) -> str:
    """'sr', 'classifier', 'purifier', or '' for a config that is no model-training job's."""
    if config is None:
        return ''
    return JOB_KINDS.get(config.get('trainer', ''), '')


def _check_kind(kind: str, expect: Optional[str], path: str, job: str) -> None:
    if expect is None or kind == expect:
        return
    wanted = {'sr': 'an SR model', 'classifier': 'a classifier', 'purifier': 'a purifier'}
    jobs = {'sr': 'teacher or student', 'classifier': 'classifier', 'purifier': 'purifier'}
    found = f"a {job} job's workdir" if job else f'a {kind} checkpoint'
    raise ValueError(
        f'{path!r} is {found}, not {wanted[expect]}; pass the workdir of a {jobs[expect]} job'
    )


def _param_folder(path: str, workdir: str, job: str) -> str:
    """The checkpoint folder to read: `path` itself if it holds steps, else the job's export,
    else its training checkpoints."""
    path = str(paths.path(path))
    if checkpointing.has_checkpoints(path):
        return path
    export = paths.join(workdir, EXPORT_FOLDERS.get(job, ''))
    if job in EXPORT_FOLDERS and checkpointing.has_checkpoints(export):
        return export
    return checkpointing.checkpoint_directory(path)


def _saved_params(state: Any, job: str) -> Any:
    """The model's parameters inside a restored state (a student's training state nests them)."""
    params = state['params'] if isinstance(state, dict) and 'params' in state else state
    if job == 'student' and isinstance(params, dict) and 'student' in params:
        params = params['student']
    return params


def purifier_network(cfg: ml_collections.ConfigDict) -> Tuple[Optional[nn.Module], Any]:
    """(network, model config) of a purifier config: the SR student of 'sr_resample', the NRP
    generator of 'nrp', (None, None) for kinds without parameters."""
    if cfg.kind == 'sr_resample':
        return models.build(cfg.student), models.flatten_config(cfg.student)
    if cfg.kind == 'nrp':
        model_config = ml_collections.ConfigDict(dict(name='nrp', **cfg.nrp.to_dict()))
        return models.build(model_config), model_config
    return None, None


def abstract_variables(module: nn.Module, kind: str, image_shape=(32, 32, 3)) -> dict:
    """Shapes of the variables `module.init` makes, from tracing only (no compute)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    kwargs = {'train': False} if kind == 'classifier' else {}
    return flax.core.unfreeze(jax.eval_shape(lambda: module.init(jax.random.key(0), x, **kwargs)))


def load(
    path: str,
    expect: Optional[str] = None,
    model_config: Optional[ml_collections.ConfigDict] = None,
    flag: str = '--config.checkpoint',
    what: str = '',
    marked: bool = True,
) -> Restored:
    """The trained model in `path` (see the module docstring).

    Args:
      path: a job's workdir, one of its checkpoint folders, or an exported model folder.
      expect: 'sr', 'classifier' or 'purifier' to refuse other kinds with a clear error.
      model_config: the architecture the caller builds; checked against the checkpoint instead of
        the saved one (and used when there is no config.json at all).
      flag: the command-line flag that gave `path`, for the error messages.
      what: what the error messages call the model ('teacher'; default from `expect`).
      marked: for a watermark job's folder, serve the marked model (False: the clean source, as
        the owner's verification needs it).
    """
    what = what or WHAT.get(expect, expect)
    if not path or not paths.path(path).exists():
        raise _missing(path, flag, what)
    config, workdir = find_job_config(path)
    job = config.get('trainer', '') if config is not None else ''
    kind = job_kind(config)
    if config is not None and not kind:
        raise ValueError(
            f'{path!r} is the workdir of a {job or "unnamed"!r} job, which trains no model; pass '
            f'{flag}=<the workdir of a finished teacher, student, classifier or purifier job>'
        )
    if kind == '':  # No config.json: the caller's architecture decides.
        if model_config is None:
            raise FileNotFoundError(
                f'{path!r} has no {CONFIG_FILE} (nor its parent folder), so its architecture is '
                f'unknown; pass {flag}=<the workdir of the job that trained it>'
            )
        kind = expect or 'sr'
    _check_kind(kind, expect, path, job)

    if kind == 'purifier':
        module, flat = purifier_network(config.purifier)
        if module is None:  # none / bicubic_resample / jpeg: nothing to restore.
            return Restored(kind, job, None, {}, None, config, 0, workdir)
    else:
        if config is not None and 'model' not in config:
            raise ValueError(
                f'{path!r} is the workdir of a {job!r} job with several models; pass {flag}=<one '
                f'of its model folders (e.g. surrogates/<name>_q<n>)>'
            )
        flat = models.flatten_config(model_config if model_config is not None else config.model)
        module = models.build(flat)
        mark = (config or {}).get('watermark')
        if marked and mark is not None and mark.get('seed', 0):
            module = watermark.Watermarked(module, mark.seed, mark.strength, flat.scale)

    directory = _param_folder(path, workdir, job)
    if not checkpointing.has_checkpoints(directory):
        raise _missing(path, flag, what)
    state, step = checkpointing.restore_newest(directory, what)
    saved = {'params': _saved_params(state, job)}
    if kind == 'classifier' and isinstance(state, dict):
        saved.update(state.get('model_state') or {})
    abstract = abstract_variables(module, kind)
    where = f'{directory} step {step}'
    variables = checkpointing.fit_to({k: saved.get(k) for k in abstract}, abstract, where)
    return Restored(
        kind, job, module, variables, flat, config or ml_collections.ConfigDict(), step, directory
    )
