"""Super-resolves your own images with a trained SR model (no ground truth needed).

  python launch.py --config=configs/upscale.py --config.checkpoint=workdirs/student \\
    --config.input='photos/*.jpg' --workdir=workdirs/upscaled

`checkpoint`: a student or teacher job's workdir (or the student job's `student/` export), or an
export folder from configs/export.py (then run by the LiteRT interpreter). Scale and architecture
come from the checkpoint's saved config. `input`: an image file, a folder or a glob; each input
becomes <workdir>/<stem>_x<scale>.png. Gray stays gray; RGBA keeps its alpha (upscaled bicubic).
Large images run in overlapping tiles (`tile` LR pixels, `overlap` pixels of context on each side,
enough for the student's receptive field; the 16-block teacher's reaches about 36), as many at
a time as there are local devices, one on each (on a 2-core CPU, launch.py's 2 host devices):
  --config.tile=256 --config.overlap=40 --config.self_ensemble=True
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    common.parse_variant(arg, ('cpu',))
    c = ml_collections.ConfigDict()
    c.trainer = 'upscale'
    c.checkpoint = ''  # required: a student/teacher workdir or an export folder
    c.input = ''  # required: an image file, a folder of images or a glob
    c.tile = 192  # LR tile side; 0 = the whole image at once
    c.overlap = 24  # LR pixels of context on each side of a tile
    c.self_ensemble = False  # EDSR+: average over the 8 flips and rotations (8x the time)
    c.runtime = 'auto'  # auto | jax | litert (auto: LiteRT for an export folder, else JAX)
    c.int8 = False  # with LiteRT: the dynamic-range int8 file
    c.threads = 0  # LiteRT interpreter threads (0: every core)
    return c
