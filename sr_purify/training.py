"""The training loop every job shares: sharded state, one compiled step, checkpoints, reports.

A trainer supplies what is particular to it (how to initialise, the loss, the batches, the
evaluation) and calls `fit`. The loop itself is the same for the teacher, the student, the
classifier and the purifier:

* shape first, then shard, then create: `jax.eval_shape` of the initialiser, replicated
  shardings for the state, `jax.jit(init, out_shardings=...)`;
* one pure step `(state, batch, rng) -> (state, metrics)` jitted once over the mesh, the batch
  sharded on 'data', the state donated; per-step randomness is `fold_in(rng, step)`, so a resumed
  run repeats exactly;
* resume from the newest valid checkpoint; save every `checkpoint_every` steps and at the end;
  SIGTERM/SIGINT finish the current step, save and return; when checkpoints exist and all are
  damaged the run stops naming them (`restart_from_scratch=True` trains from step 0 instead);
* a non-finite loss stops the run, names the step and leaves the last good checkpoint.
"""

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import periodic_actions

from sr_purify import checkpointing, paths, registry, reporting, sharding

PyTree = Any
# loss_fn(params, model_state, batch, rng) -> (loss, (new_model_state, extra_metrics));
# with `fit(..., frozen=tree)` it takes the frozen tree as a fifth argument.
LossFn = Callable[
    [PyTree, PyTree, Dict[str, jax.Array], jax.Array],
    Tuple[jax.Array, Tuple[PyTree, Dict[str, jax.Array]]],
]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree  # Non-trained variables such as batch_stats; {} when there are none.


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class FitResult:
    state: TrainState
    step: int
    preempted: bool
    steps_per_sec: float
    wall_s: float


# ---------------------------------------------------------------------------------------------
# Optimiser from the config.


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr, warmup = optim.lr, optim.get('warmup_steps', 0)
    kinds = {
        'constant': lambda: optax.constant_schedule(lr),
        'cosine': lambda: optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            warmup,
            max(total_steps, warmup + 1),
            end_value=lr * optim.get('end_factor', 0.0),
        ),
        # EDSR's schedule: halve every `decay_every` steps.
        'step': lambda: optax.exponential_decay(
            lr, optim.get('decay_every', 200_000), 0.5, staircase=True
        ),
    }
    schedule = registry.lookup(kinds, optim.get('schedule', 'constant'), 'lr schedule')()
    if warmup and optim.get('schedule', 'constant') != 'cosine':
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup]
        )
    return schedule


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim, total_steps)
    # `decay_kernels_only`: no weight decay on 1-D parameters (biases, BatchNorm scales/offsets).
    decay_mask = (
        (lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
        if optim.get('decay_kernels_only', False)
        else None
    )
    kinds = {
        'adam': lambda: optax.adam(
            schedule, b1=optim.get('b1', 0.9), b2=optim.get('b2', 0.999), eps=optim.get('eps', 1e-8)
        ),
        'adamw': lambda: optax.adamw(
            schedule,
            b1=optim.get('b1', 0.9),
            b2=optim.get('b2', 0.999),
            weight_decay=optim.get('weight_decay', 1e-4),
            mask=decay_mask,
        ),
        'sgd': lambda: optax.chain(
            optax.add_decayed_weights(optim.get('weight_decay', 0.0), mask=decay_mask),
            optax.sgd(schedule, momentum=optim.get('momentum', 0.9), nesterov=True),
        ),
    }
    tx = registry.lookup(kinds, optim.name, 'optimizer')()
    if optim.get('grad_clip_norm', 0.0):
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx, schedule


# ---------------------------------------------------------------------------------------------
# State creation (shape first, then shard, then create) and the compiled step.


def create_state(
    init_variables: Callable[[jax.Array], Tuple[PyTree, PyTree]],
    tx: optax.GradientTransformation,
    mesh,
    rng: jax.Array,
) -> Tuple[TrainState, Any]:
    def init(rng):
        params, model_state = init_variables(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
        )

    abstract = jax.eval_shape(init, rng)
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    return state, state_sharding


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """The pure update step: `(state, batch, rng[, frozen]) -> (state, metrics)`."""

    def train_step(state: TrainState, batch, rng, *frozen):
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (model_state, extra)), grads = grad_fn(
            state.params, state.model_state, batch, step_rng, *frozen
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        metrics = {
            'loss': loss,
            'grad_norm': optax.tree.norm(grads),
            'learning_rate': schedule(state.step),
            **extra,
        }
        return new_state, metrics

    return train_step


def compile_step(train_step, mesh, state_sharding, num_frozen: int = 0):
    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.data_sharding(mesh), replicated)
        + (replicated,) * num_frozen,
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def abstract_with_sharding(state: TrainState, state_sharding) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding
    )


# ---------------------------------------------------------------------------------------------
# Preemption.


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.received = signum
        logging.warning(
            'received %s: finishing the current step, then saving', signal.Signals(signum).name
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_stop(local: bool) -> bool:
    """Whether any process has been asked to stop. Every process calls this after every step, so
    all of them stop (and save) at the same step: a decision each process took alone would leave
    one host in the collective save while another enters the next step's all-reduce, a hang."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    votes = multihost_utils.process_allgather(np.asarray([local], np.int32))
    return bool(np.asarray(votes).max())


# ---------------------------------------------------------------------------------------------
# Config checks and resuming.


def _intervals(config: ml_collections.ConfigDict) -> Tuple[int, int, int]:
    return (
        config.get('log_every', 50),
        config.get('eval_every', 0),
        config.get('checkpoint_every', 1000),
    )


def check_intervals(config: ml_collections.ConfigDict) -> None:
    """A one-line ValueError for an interval the loop would divide by zero (or never reach)."""
    log_every, eval_every, ckpt_every = _intervals(config)
    for name, value, lowest, valid in (
        ('log_every', log_every, 1, 'an integer >= 1'),
        ('checkpoint_every', ckpt_every, 1, 'an integer >= 1'),
        ('eval_every', eval_every, 0, 'an integer >= 1, or 0 to evaluate only at the end'),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lowest:
            raise ValueError(f'config.{name}={value!r} is not valid; it must be {valid}')


def _resume(ckpt: checkpointing.Checkpointer, abstract: Any, config: ml_collections.ConfigDict):
    """(state, step) of the newest valid checkpoint, or (None, None) to start at step 0.

    Damaged steps are moved aside once an older one restores. When every step is damaged the run
    stops: training from step 0 on its own would silently throw the run away, so it happens only
    with `config.restart_from_scratch`.
    """
    try:
        return ckpt.restore(abstract, quarantine=True)
    except checkpointing.NoValidCheckpointError as e:
        if not config.get('restart_from_scratch', False):
            raise checkpointing.NoValidCheckpointError(
                f'{e}; to train from step 0 instead pass --config.restart_from_scratch=True '
                f'(the damaged steps are then moved to <step>.damaged)',
                e.steps,
            ) from None
        logging.warning('%s; restart_from_scratch=True: training from step 0', e)
        ckpt.quarantine(e.steps)  # Frees those step numbers for the new run's saves.
        return None, None


# ---------------------------------------------------------------------------------------------
# The loop.


def fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_variables: Callable[[jax.Array], Tuple[PyTree, PyTree]],
    loss_fn: LossFn,
    batches: Callable[[int], Iterator[Dict[str, np.ndarray]]],
    evaluate: Optional[Callable[[TrainState, int], Dict[str, float]]] = None,
    checkpoint_dir: Optional[str] = None,
    frozen: Optional[PyTree] = None,
    writer=None,
) -> FitResult:
    """Trains `config.total_steps` steps (resuming if a checkpoint exists) and returns the state.

    `batches(start_step)` yields process-local numpy batches from `start_step` on. `frozen` is a
    tree the loss reads but never trains (e.g. a teacher's parameters): it goes to every step as a
    separate replicated argument, `loss_fn`'s fifth, so it is in neither the state, the optimiser
    nor the checkpoints.
    """
    t_start = time.time()
    check_intervals(config)
    reporting.check_workdir(workdir)
    writer = writer or reporting.create_writer(workdir)
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.batch_size, mesh)
    total_steps = config.total_steps
    tx, schedule = make_optimizer(config.optim, total_steps)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state, state_sharding = create_state(init_variables, tx, mesh, init_rng)

    ckpt = checkpointing.Checkpointer(
        checkpoint_dir or paths.join(workdir, 'checkpoints'),
        max_to_keep=config.get('keep_checkpoints', 3),
    )
    restored, restored_step = _resume(ckpt, abstract_with_sharding(state, state_sharding), config)
    if restored is not None:
        state = restored
        logging.info('resumed from checkpoint step %d', restored_step)
    start_step = int(sharding.to_host(state.step))

    # Every process holds the whole frozen tree: its local data is the global (replicated) array.
    frozen_args = (
        ()
        if frozen is None
        else (
            jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(
                    sharding.replicated(mesh), np.asarray(x)
                ),
                frozen,
            ),
        )
    )
    step_fn = compile_step(
        make_train_step(loss_fn, tx, schedule), mesh, state_sharding, len(frozen_args)
    )
    log_every, eval_every, ckpt_every = _intervals(config)
    stop_every = max(1, int(config.get('stop_check_every', 1)))
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=log_every
    )
    last_saved = restored_step
    preempted = False
    steps_done, t_loop = 0, None

    def check_finite(metrics, step):
        loss = float(sharding.to_host(metrics['loss']))
        if not np.isfinite(loss):
            raise NonFiniteLossError(
                f'non-finite loss {loss} at step {step}; stopping. The last good checkpoint is '
                f'step {last_saved} in {ckpt.directory}'
                if last_saved is not None
                else f'non-finite loss {loss} at step {step}; stopping (no checkpoint saved yet)'
            )

    pending = None  # (step, metrics) of the previous step: checked one step late, no stall.
    try:
        with _StopSignal() as stop:
            it = batches(start_step)
            for step in range(start_step + 1, total_steps + 1):
                batch = sharding.to_global(next(it), mesh)
                state, metrics = step_fn(state, batch, step_rng, *frozen_args)
                if pending is not None:
                    check_finite(*pending)
                pending = (metrics, step)
                if t_loop is None:
                    jax.block_until_ready(metrics)  # First step includes compilation.
                    t_loop = time.time()
                else:
                    steps_done += 1
                progress(step)
                is_last = step == total_steps
                if step % log_every == 0 or is_last:
                    check_finite(metrics, step)
                    writer.write_scalars(step, sharding.to_host(metrics))
                # Every process votes at the same steps (a 6 ms all-gather on 2 CPU processes).
                vote = step % stop_every == 0 or is_last
                stop_now = (vote and agreed_stop(stop.received is not None)) or (
                    jax.process_count() > 1 and ckpt.manager.reached_preemption(step)
                )
                if step % ckpt_every == 0 or is_last or stop_now:
                    check_finite(metrics, step)
                    ckpt.save(step, state)
                    last_saved = step
                if stop_now:
                    logging.warning('stopped by signal at step %d; checkpoint saved', step)
                    preempted = True
                    break
                if evaluate is not None and eval_every and step % eval_every == 0 and not is_last:
                    writer.write_scalars(step, evaluate(state, step))
            if pending is not None:
                check_finite(*pending)
    finally:
        ckpt.close()
        writer.flush()
    elapsed = time.time() - t_loop if t_loop else 0.0
    steps_per_sec = steps_done / elapsed if elapsed > 0 else float('nan')
    return FitResult(
        state=state,
        step=int(sharding.to_host(state.step)),
        preempted=preempted,
        steps_per_sec=steps_per_sec,
        wall_s=time.time() - t_start,
    )
