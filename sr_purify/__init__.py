"""sr_purify: SR teacher/student distillation, adversarial attacks and self-supervised purification.

The Python API (see README "Use it from Python"):

    import sr_purify
    sr = sr_purify.load_sr('workdirs/student')
    big = sr.upscale(photo)

`load_sr`, `load_classifier` and `load_purifier` live in `sr_purify.api` and are imported on first
use, so `import sr_purify.perf` (which launch.py runs before JAX starts) stays light.
The layout, lowest layer first, is in the README ("Layout").
"""

__version__ = '0.2.0'
_API = ('load_sr', 'load_classifier', 'load_purifier')


def __getattr__(name):
    if name in _API:
        from sr_purify import api

        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(list(globals()) + list(_API))
