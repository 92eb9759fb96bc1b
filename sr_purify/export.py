"""Export an SR model for deployment: SavedModel, LiteRT (.tflite) f32 and int8, and a runner.

    report = export.export_all(apply_fn, params, 'exports/student', verify_image=lr)
    run = export.LiteRTModel('exports/student/model_f32.tflite')
    sr = run(lr)  # float32 (1, h, w, 3) in [0, 1] -> (1, h * scale, w * scale, 3)

The route is JAX -> TF SavedModel (orbax-export's `JaxModule`, jax2tf with StableHLO inside) ->
`tf.lite.TFLiteConverter`. Batch, height and width stay symbolic, so one file serves any image
size; channels are fixed at 3 (flax checks the kernel's input channels against a concrete number).
The int8 file is dynamic-range quantised: int8 weights, float activations, no calibration data
(a briefly trained student: Set5 x2 PSNR 36.781 dB int8 against 36.784 dB f32, a third the bytes).
Speed: on XNNPACK the dynamic-shape file runs 2-3x slower than jitted JAX on a 2-core Xeon, a
fixed-shape one (`input_shape=`) about as fast as JAX (bench/deploy.py).

Models must slice channels with `jnp.split` or `lax.slice_in_dim`, not `y[..., :d]`: with symbolic
sizes indexing lowers to a dynamic gather, which the converter refuses ("'vhlo.dynamic_gather_v1'
op is not part of the vhlo support yet"). IMDN does so today and fails; with `jnp.split` it
converts and matches JAX to 2e-6.

ONNX is not offered: jax2onnx 0.17.1 converts networks without `jax.image.resize` (FSRCNN matched
JAX to 4e-7), but not those with the bicubic skip (the student and the teacher). With symbolic
sizes its resize plugin needs constant dimensions (InconclusiveDimensionOperation: "Symbolic
dimension 'B' used in a context that requires a constant"); with fixed sizes it refuses
`antialias=True`, `jax.image.resize`'s default ("resize with antialias=True is not supported yet").

Import cost: this module imports only numpy at the top, so the upscale job and the API can use
`LiteRTModel` without JAX or TensorFlow; the export functions import those when called.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

QUANTIZE = ('none', 'dynamic_int8')
# Tolerance of the f32 export against JAX: one 8-bit grey level, what a saved PNG can show.
F32_ATOL = 1.0 / 255.0
# Floor for int8 against JAX's output (dB); dynamic-range int8 of these nets gives 40-50 dB, so
# anything under this is a broken conversion, not quantisation noise.
INT8_MIN_PSNR = 30.0
SAVED_MODEL = 'saved_model'
FILES = {'model_f32.tflite': 'none', 'model_int8.tflite': 'dynamic_int8'}


class ExportMismatchError(AssertionError):
    """An exported model does not reproduce the JAX model on the verification image."""


def _tensorflow():
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf

    try:  # TF must not take the accelerator JAX uses; this fails once TF has its devices.
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:
        pass
    return tf


def export_saved_model(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    directory: str,
    input_shape: Optional[Sequence[int]] = None,
) -> str:
    """Writes `apply_fn(params, x)` as a SavedModel with signature 'serving_default'.

    Input: float32 (batch, height, width, 3) with every size but the channels dynamic, or exactly
    `input_shape` if given. A fixed shape makes a LiteRT file that runs 2-3x faster (the dynamic
    graph keeps shape arithmetic, explicit pads and bias broadcasts that split XNNPACK's graph),
    for a server that only sees one size. The parameters become TF variables. Returns `directory`.
    """
    tf = _tensorflow()
    import jax
    from orbax.export import ExportManager, JaxModule, ServingConfig

    # Host copies: parameters sharded over several devices would be gathered by jax2tf anyway.
    params = jax.device_get(params)
    if input_shape is None:
        polymorphic, shape = 'b, h, w, 3', (None, None, None, 3)
    else:
        polymorphic, shape = None, tuple(int(d) for d in input_shape)
    module = JaxModule(params, apply_fn, input_polymorphic_shape=polymorphic)
    signature = [tf.TensorSpec(shape, tf.float32, name='lr')]
    manager = ExportManager(module, [ServingConfig('serving_default', input_signature=signature)])
    manager.save(directory)
    return directory


def to_tflite(saved_model_dir: str, path: str, quantize: str = 'none') -> str:
    """Converts a SavedModel to a .tflite file at `path`; returns `path`.

    `quantize`: 'none' (float32) or 'dynamic_int8' (int8 weights, float activations).
    """
    if quantize not in QUANTIZE:
        raise ValueError(f'unknown quantize {quantize!r}; valid: {", ".join(QUANTIZE)}')
    tf = _tensorflow()
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if quantize == 'dynamic_int8':
        # Optimize.DEFAULT with no representative dataset is dynamic-range quantisation.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    flatbuffer = converter.convert()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(flatbuffer)
    return path


class LiteRTModel:
    """Runs a .tflite SR model with the LiteRT interpreter (XNNPACK on the CPU).

    `model(x)`: float32 (1, h, w, 3) in [0, 1] -> numpy (1, h * s, w * s, 3). The input tensor is
    resized, and the interpreter's buffers reallocated, only when the input shape changes. A file
    exported for one fixed shape takes only that shape.
    """

    def __init__(self, path: str, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter  # Not at the top: it costs ~0.3 s.

        self.path = path
        self._interpreter = Interpreter(model_path=path, num_threads=num_threads)
        (inp,) = self._interpreter.get_input_details()
        (out,) = self._interpreter.get_output_details()
        self._input, self._output = inp['index'], out['index']
        self._shape: Optional[tuple] = None
        self.fixed_shape = None
        if all(d > 0 for d in inp['shape_signature']):
            self.fixed_shape = tuple(int(d) for d in inp['shape'])

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f'expected a float32 (1, h, w, 3) image, got shape {x.shape}')
        if self.fixed_shape and x.shape != self.fixed_shape:
            raise ValueError(
                f'{self.path} was exported for input shape {self.fixed_shape} only, got {x.shape}'
            )
        if x.shape != self._shape:
            if not self.fixed_shape:
                self._interpreter.resize_tensor_input(self._input, x.shape, strict=False)
            self._interpreter.allocate_tensors()
            self._shape = x.shape
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # A copy: safe across calls.


class _SavedModelRunner:
    """The SavedModel's serving signature as a numpy function (for verification only)."""

    def __init__(self, directory: str):
        tf = _tensorflow()
        self._tf = tf
        self._fn = tf.saved_model.load(directory).signatures['serving_default']

    def __call__(self, x) -> np.ndarray:
        (y,) = self._fn(self._tf.constant(np.asarray(x, np.float32))).values()
        return y.numpy()


def psnr_db(a, b) -> float:
    """PSNR of `a` against `b`, both in [0, 1], over every pixel (not the SR convention)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def check_parity(run, image, expected, label: str, atol: float = F32_ATOL) -> Dict[str, float]:
    """Runs `run(image)` and raises ExportMismatchError unless it is within `atol` of `expected`."""
    got = np.asarray(run(image))
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        raise ExportMismatchError(f'{label}: output shape {got.shape}, JAX gives {expected.shape}')
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not diff <= atol:  # `not <=` also catches NaN.
        raise ExportMismatchError(
            f'{label}: max abs difference from JAX {diff:.3g} > {atol:.3g} on a '
            f'{tuple(image.shape)} image'
        )
    return {'max_abs_diff': diff, 'psnr_vs_jax': psnr_db(got, expected)}


def _bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def export_all(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    directory: str,
    verify_image,
    expected: Optional[np.ndarray] = None,
    fixed_sizes: Sequence[Sequence[int]] = (),
) -> Dict[str, Dict[str, float]]:
    """Writes <directory>/saved_model/, model_f32.tflite and model_int8.tflite, checking each.

    `verify_image`: a real float32 (1, h, w, 3) image in [0, 1] (a crop of a photo: random noise
    hides errors that only show on image statistics). Each file's output on it is compared with
    `expected` (default: `jax.jit(apply_fn)(params, verify_image)`): the SavedModel and the f32
    file must be within 1/255 (max abs), the int8 file above INT8_MIN_PSNR dB; otherwise
    ExportMismatchError names the file. `fixed_sizes`: LR (h, w) sizes that also get a fixed-shape
    pair of files (`fixed_files`), checked the same way on the photo cut or reflected to that size.
    Returns {file: {'max_abs_diff', 'psnr_vs_jax', 'bytes'}}.
    """
    image = np.asarray(verify_image, np.float32)
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] != 3:
        raise ValueError(f'verify_image must be float32 (1, h, w, 3), got shape {image.shape}')
    import jax

    reference = jax.jit(apply_fn)
    own_reference = expected is None  # A caller's `expected` exists for `verify_image` only.
    if own_reference:
        expected = np.asarray(reference(params, image))
    expected = np.asarray(expected, np.float64)
    os.makedirs(directory, exist_ok=True)

    report = {}
    saved_model = export_saved_model(apply_fn, params, os.path.join(directory, SAVED_MODEL))
    report[SAVED_MODEL] = check_parity(_SavedModelRunner(saved_model), image, expected, SAVED_MODEL)
    report[SAVED_MODEL]['bytes'] = _bytes(saved_model)
    report.update(_tflite_files(saved_model, directory, FILES, image, expected))
    for h, w in fixed_sizes:
        # A file per fixed LR size (e.g. the upscale job's tile window): 2-3x faster in LiteRT.
        fixed_image = _resized_to(image, h, w)
        fixed_expected = (
            np.asarray(reference(params, fixed_image), np.float64) if own_reference else None
        )
        with tempfile.TemporaryDirectory() as tmp:
            fixed_model = export_saved_model(apply_fn, params, tmp, input_shape=(1, h, w, 3))
            report.update(
                _tflite_files(
                    fixed_model, directory, fixed_files(h, w), fixed_image, fixed_expected
                )
            )
    return report


def fixed_files(h: int, w: int) -> Dict[str, str]:
    """{file name: quantisation} of the fixed-size files for an h x w LR input."""
    return {f'model_f32_{h}x{w}.tflite': 'none', f'model_int8_{h}x{w}.tflite': 'dynamic_int8'}


def _resized_to(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """The verification photo cut or reflected to h x w (a real photo either way)."""
    y = image[:, :h, :w]
    pad = ((0, 0), (0, h - y.shape[1]), (0, w - y.shape[2]), (0, 0))
    return np.pad(y, pad, mode='reflect') if any(p[1] for p in pad) else y


def _tflite_files(saved_model, directory, files, image, expected) -> Dict[str, Dict[str, float]]:
    """Converts `saved_model` to each of `files` and checks it on `image` (see export_all)."""
    report = {}
    for name, quantize in files.items():
        path = to_tflite(saved_model, os.path.join(directory, name), quantize)
        run = LiteRTModel(path)
        if expected is None:
            row = {'max_abs_diff': float('nan'), 'psnr_vs_jax': float('nan')}
        elif quantize == 'none':
            row = check_parity(run, image, expected, name)
        else:  # Quantised weights move every pixel a little: judge it by PSNR instead.
            row = check_parity(run, image, expected, name, atol=math.inf)
            if not row['psnr_vs_jax'] >= INT8_MIN_PSNR:
                raise ExportMismatchError(
                    f'{name}: PSNR against JAX {row["psnr_vs_jax"]:.1f} dB < {INT8_MIN_PSNR} dB'
                )
        row['bytes'] = _bytes(path)
        report[name] = row
    return report


class LiteRTByShape:
    """A folder's LiteRT files as one SR function: each input shape that has a fixed-size file of
    its own runs through it (faster), every other shape through the dynamic file."""

    def __init__(self, dynamic_path: str, fixed_paths: Dict[tuple, str], num_threads: int = 2):
        self.path = dynamic_path
        self._paths = {tuple(shape): p for shape, p in fixed_paths.items()}
        self._threads = num_threads
        self._models: Dict[Any, LiteRTModel] = {}

    def __call__(self, x) -> np.ndarray:
        shape = tuple(np.shape(x)[1:3])
        key = shape if shape in self._paths else None
        if key not in self._models:
            path = self._paths[key] if key is not None else self.path
            self._models[key] = LiteRTModel(path, self._threads)
        return self._models[key](x)


def psnr_on_images(run: Callable[[Any], Any], images, scale: int) -> float:
    """Mean PSNR (dB, Y channel, `scale` pixels shaved: the SR convention) of `run` on `images`.

    `run`: (1, h, w, 3) float in [0, 1] -> SR image (a LiteRTModel, or a jitted JAX apply).
    `images`: as `sr_purify.sr_data.eval_images(path)[1]`.
    """
    from sr_purify.evaluators import sr  # Lazily: it imports JAX.

    return float(sr.evaluate_images(lambda x: run(np.asarray(x)), images, scale)['psnr'])
