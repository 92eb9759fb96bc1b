"""Exports a trained SR model for devices and servers: TF SavedModel and LiteRT (f32, int8).

  python launch.py --config=configs/export.py --config.checkpoint=workdirs/student \\
    [--workdir=workdirs/export]

Writes <workdir>/saved_model/, model_f32.tflite, model_int8.tflite (dynamic-range int8 weights)
and sr_model.json (scale, architecture, source), plus fixed-shape files for `fixed_sizes`
(model_f32_<h>x<w>.tflite, model_int8_<h>x<w>.tflite: by default the upscale job's tile window).
Every file is verified as it is written: a real photo through it equals the JAX model within
1/255 (f32); the int8 file's PSNR on `eval_dataset` is printed beside f32's and JAX's. The main
files have dynamic height and width (one file serves any size); the fixed ones run faster.
The upscale job and `sr_purify.load_sr` run the folder with the LiteRT interpreter:
  python launch.py --config=configs/upscale.py --config.checkpoint=workdirs/export \\
    --config.input=photo.png
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    common.parse_variant(arg, ('cpu',))
    c = ml_collections.ConfigDict()
    c.trainer = 'export'
    c.checkpoint = ''  # required: a student (or teacher) job's workdir
    # PSNR of JAX, f32 and int8 on this set (x scale, SR convention); '' skips it.
    c.eval_dataset = '../shared/data/sr_benchmarks/Set5'
    c.verify_crop = 96  # LR side of the photo crop every export is checked on
    # LR (h, w) sizes that also get fixed-shape files, which LiteRT runs 2-3x faster than the
    # dynamic one: by default the upscale job's tile window (tile 192 + 2 x overlap 24).
    c.fixed_sizes = ((240, 240),)
    return c
