"""Fields every job shares. Each job's config starts from `base()` and changes a few fields."""

import ml_collections


def parse_variant(arg, variants, default: str = 'cpu', options=()):
    """The `:arg` of `--config=configs/<job>.py:arg`, for every config file.

    'full,imdn,scale=4' -> (['full', 'imdn'], {'scale': 4}): the variant names in order, and the
    `name=value` settings allowed by `options` (digits become ints). An unknown part fails listing
    the variants and settings.
    """
    parts, settings = [], {}
    for p in (arg or default).split(','):
        key, eq, value = p.partition('=')
        if not p:
            continue
        if eq and key in options:
            settings[key] = int(value) if value.isdigit() else value
        elif p in variants:
            parts.append(p)
        else:
            valid = ', '.join(list(variants) + [f'{o}=N' for o in options])
            raise ValueError(f'unknown config variant {p!r}; valid: {valid}')
    return parts, settings


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = ''
    c.seed = 0
    # Data parallel: the batch is split over every device on the 'data' axis.
    c.mesh = [('data', -1)]
    c.batch_size = 16  # Global batch; must divide by the device count.
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 0  # 0: evaluate only at the end.
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # Steps between the hosts' vote on a stop signal (every host stops at the same step).
    c.stop_check_every = 1
    # When checkpoints exist but every one is damaged, the job stops naming them; True moves them
    # to <step>.damaged and trains from step 0 instead (a deliberate choice, never a silent one).
    c.restart_from_scratch = False
    c.optim = ml_collections.ConfigDict(
        dict(
            name='adam',
            lr=2e-4,
            schedule='cosine',
            warmup_steps=0,
            end_factor=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=0.0,
            weight_decay=0.0,
            momentum=0.9,
            decay_every=200_000,
        )
    )
    return c


def sr_data(source: str = 'embedded', patch: int = 32) -> ml_collections.ConfigDict:
    """SR training data: `embedded` (scikit-image photos), `folder` (path) or `tfds` (name)."""
    return ml_collections.ConfigDict(
        dict(
            source=source,
            patch=patch,  # LR patch side; the HR crop is patch * scale.
            path='',
            eval_path='',  # folder source
            name='div2k/bicubic_x2',
            data_dir='',
            split='train',
            download=False,
            cache=False,
            shuffle_buffer=64,  # tfds source
            skip_bad=False,
            prefetch=2,
        )
    )


def edsr(
    scale: int = 2,
    num_blocks: int = 16,
    features: int = 64,
    res_scale: float = 1.0,
    bicubic_skip: bool = False,
    upsampler: str = 'edsr',
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name='edsr',
            scale=scale,
            num_blocks=num_blocks,
            features=features,
            res_scale=res_scale,
            bicubic_skip=bicubic_skip,
            upsampler=upsampler,
        )
    )
