"""The fine-tuning recipe on DALI: timm's training transform rebuilt from DALI's operations, and the official
evaluation transform.

The recipe is read from the timm objects the ``torch`` backend runs (:func:`mae_fast.data.transforms.
official_train_transform`: the random resized crop's scale and ratio, the RandAugment policy as timm parsed
``--aa``, the color jitter, the ``RandomErasing`` settings), so both backends follow one configuration. The
:class:`~mae_fast.data.dali_loader.DaliLoader` feeds the pipeline as it feeds pretraining's: the main process draws
every random choice from the slot's augmentation seed (the crop box and flip, RandAugment's operations, magnitudes
and signs, the jitter factors and their order, the erased boxes and their fill) and DALI draws no random numbers of
its own, so a run resumed mid-epoch, on a new pipeline, gets the pixels of the uninterrupted run.

Training, in timm's order:

- the crop (scale (0.08, 1), aspect (3/4, 4/3)) decoded alone (``decoders.image_slice``), resized bicubic with
  antialiasing to ``input_size``, flipped with probability ``--hflip`` (1/2, timm's, unless given);
- ``--aa rand-...``: timm's RandAugment policy (``n`` operations chosen with replacement from the policy's list, each
  applied with the policy's probability, 0.5 by default, at magnitude ``m`` plus Gaussian noise of std ``mstd``
  clipped to [0, ``mmax`` or 10]; ``inc1`` picks the operations whose strength grows with the magnitude), each
  operation run by DALI's ``nvidia.dali.auto_aug`` augmentation of that name with the parameter timm's rule gives
  for the level (:data:`RAND_AUGMENT_OPS`), chosen per sample with ``auto_aug.core.select``. DALI's
  ``auto_aug.rand_augment()`` itself is not used: it draws its choices inside the pipeline (a resumed run's new
  pipeline would draw others), applies every chosen operation, at a fixed magnitude, and its suite is not timm's
  (no invert, solarize-add or magnitude noise; posterize from 8 to 4 bits where timm's goes from 4 to 0);
- ``--aa none`` with ``--color_jitter``: torchvision's ``ColorJitter(c, c, c)`` as timm builds it (brightness,
  contrast and saturation factors uniform in [max(0, 1 - c), 1 + c], applied in a random order), with DALI's
  PIL-like brightness, contrast and color operations;
- ImageNet normalization, then ``--reprob`` random erasing with timm's box distribution (1 to ``--recount`` boxes of
  2 % to 1/3 of the image, aspect 0.3 to 3.3, ten tries each) by ``fn.erase``, filled with zeros (``const``), one
  normal color per box (``rand``), or per-pixel normal values (``pixel``).

Where the images differ from the ``torch`` backend's (timm on PIL), in detail only:

- resampling is DALI's: bicubic with antialiasing, within one level of Pillow's on smooth images;
- RandAugment's geometric operations (rotate, shear, translate) interpolate bilinearly (DALI's warps offer linear or
  nearest only; timm's are bicubic here) and fill with one gray, the ImageNet mean's average level 115, where timm
  fills with the mean color (124, 116, 104);
- equalize follows OpenCV's formula, sharpness leaves a 1-pixel border, color is DALI's saturation operator (timm:
  PIL's ``ImageEnhance.Color``), and the contrast center is computed in floating point;
- a magnitude drawn with noise is rounded to 1/100 of a level;
- ``pixel`` erasing takes its normal values from a fixed bank of :data:`NOISE_BANK_MARGIN` + ``input_size`` squared
  values per channel (drawn once from the run's seed), at a window offset drawn per image, so that the fill is as
  repeatable as the rest; timm draws fresh values for each box.

Evaluation: the official transform exactly in geometry: the shorter side resized to ``int(input_size / 0.875)``
(the longer one scaled and truncated, as torchvision's ``Resize``), a center crop of ``input_size`` at torchvision's
offsets, both computed from each image's header size; the resampling is DALI's bicubic with antialiasing (within one
level of Pillow's on the test images).

The operations run on the CPU pipeline too (DALI supports CPU samples in its automatic augmentations since 1.25),
which is how the tests run them.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from mae_fast.data.files import image_size
from mae_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_geometry, slot_uniforms, stream_seeds, \
    train_crops
from mae_fast.errors import ConfigError

#: timm's magnitude scale: level 10 is an operation's full strength (``_LEVEL_DENOM``).
LEVEL_DENOM = 10
#: Magnitude bins per level: a level drawn with noise is rounded to 1/100.
BINS_PER_LEVEL = 100
#: Random streams of a slot's seed (see :func:`~mae_fast.data.transforms.stream_seeds`); erasing takes the stream the
#: ``torch`` backend's erasing takes.
ERASING_STREAM, RAND_AUGMENT_STREAM, JITTER_STREAM = 2, 3, 4
#: Extra rows and columns of the ``pixel`` erasing noise bank: a window of ``input_size`` starts at one of
#: (margin + 1)^2 offsets.
NOISE_BANK_MARGIN = 256


# ---------------------------------------------------------------------------------------------- RandAugment


def _posterize_mask(bits: int) -> np.uint8:
    """The mask keeping the ``bits`` high bits of each level, as Pillow's posterize; 0 bits gives black, as the
    ``torch`` backend's :func:`~mae_fast.data.transforms.posterize_any_bits` (DALI's own posterize keeps 1 bit)."""
    bits = min(max(int(bits), 0), 8)
    return np.uint8(0xFF ^ (2 ** (8 - bits) - 1))


def _sharpness_kernel(factor: float) -> np.ndarray:
    """Pillow's ``ImageEnhance.Sharpness(factor)`` as one 3x3 kernel: ``factor`` of the image, ``1 - factor`` of its
    smoothed copy (Pillow's SMOOTH filter)."""
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float64) / 13
    identity = np.zeros((3, 3))
    identity[1, 1] = 1
    return ((1 - factor) * smooth + factor * identity).astype(np.float32)


def _enhance(level, _):
    return level / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(level, _):
    return max(0.1, 1.0 + level / LEVEL_DENOM * 0.9)


def _posterize_bits(level, _):
    return int(level / LEVEL_DENOM * 4)


def _solarize_threshold(level, _):
    return min(256, int(level / LEVEL_DENOM * 256))


#: timm's RandAugment operations (by timm's name) -> (DALI ``auto_aug.augmentations`` name, whether timm negates the
#: magnitude at random, timm's argument for a level: ``rule(level, hparams)``, with the sign already in ``level`` for
#: negated ones; None for operations without a magnitude). The rules are timm's ``LEVEL_TO_ARG``, rewritten, and
#: tested against it.
RAND_AUGMENT_OPS = {
    "AutoContrast": ("auto_contrast", False, None),
    "Equalize": ("equalize", False, None),
    "Invert": ("invert", False, None),
    "Rotate": ("rotate", True, lambda level, _: level / LEVEL_DENOM * 30.0),
    "Posterize": ("posterize", False, _posterize_bits),
    "PosterizeIncreasing": ("posterize", False, lambda level, h: 4 - _posterize_bits(level, h)),
    "PosterizeOriginal": ("posterize", False, lambda level, h: _posterize_bits(level, h) + 4),
    "Solarize": ("solarize", False, _solarize_threshold),
    "SolarizeIncreasing": ("solarize", False, lambda level, h: 256 - _solarize_threshold(level, h)),
    "SolarizeAdd": ("solarize_add", False, lambda level, _: min(128, int(level / LEVEL_DENOM * 110))),
    "Color": ("color", False, _enhance),
    "ColorIncreasing": ("color", True, _enhance_increasing),
    "Contrast": ("contrast", False, _enhance),
    "ContrastIncreasing": ("contrast", True, _enhance_increasing),
    "Brightness": ("brightness", False, _enhance),
    "BrightnessIncreasing": ("brightness", True, _enhance_increasing),
    "Sharpness": ("sharpness", False, _enhance),
    "SharpnessIncreasing": ("sharpness", True, _enhance_increasing),
    "ShearX": ("shear_x", True, lambda level, _: level / LEVEL_DENOM * 0.3),
    "ShearY": ("shear_y", True, lambda level, _: level / LEVEL_DENOM * 0.3),
    # timm's translate_pct default (its hparams carry none unless a policy sets one)
    "TranslateXRel": ("translate_x", True, lambda level, h: level / LEVEL_DENOM * h.get("translate_pct", 0.45)),
    "TranslateYRel": ("translate_y", True, lambda level, h: level / LEVEL_DENOM * h.get("translate_pct", 0.45)),
    "TranslateX": ("translate_x_no_shape", True, lambda level, h: level / LEVEL_DENOM * float(h["translate_const"])),
    "TranslateY": ("translate_y_no_shape", True, lambda level, h: level / LEVEL_DENOM * float(h["translate_const"])),
}


def _dali_param(dali_name: str, argument) -> np.ndarray:
    """timm's argument of an operation -> the parameter DALI's augmentation of ``dali_name`` takes."""
    if dali_name == "posterize":
        return _posterize_mask(argument)
    if dali_name == "solarize":
        return np.float32(argument)
    if dali_name == "solarize_add":
        return np.uint8(argument)
    if dali_name == "sharpness":
        return _sharpness_kernel(argument)
    # DALI's shears and translations map source to destination, Pillow's affine transforms (timm's) destination to
    # source: the same argument moves the image the other way.
    if dali_name in ("shear_x", "translate_x", "translate_x_no_shape"):
        return np.array([-argument, 0], dtype=np.float32)
    if dali_name in ("shear_y", "translate_y", "translate_y_no_shape"):
        return np.array([0, -argument], dtype=np.float32)
    return np.float32(argument)  # rotate's angle, the enhance factors


def _apply_operation(body, index: int, images, ra_params, shape, fill_value, interp_type):
    """DALI's augmentation ``body`` on ``images`` with parameter ``ra_params[index]`` and those of ``shape``,
    ``fill_value`` and ``interp_type`` it takes."""
    code = body.__code__
    accepted = code.co_varnames[:code.co_argcount]
    extra = {name: value for name, value in (("shape", shape), ("fill_value", fill_value),
                                             ("interp_type", interp_type)) if name in accepted}
    return body(images, ra_params[index], **extra)


class DaliRandAugment:
    """timm's ``RandAugment`` (``policy``, as :func:`timm.data.auto_augment.rand_augment_transform` built it from
    ``--aa``) as DALI operations fed per-sample choices.

    :meth:`draw` gives each slot's operations and signed magnitude bins from its seed; :meth:`graph` adds the
    external sources and the operations to a pipeline being defined (``enable_conditionals=True``): each layer picks
    every sample's operation with ``auto_aug.core.select`` and hands it its parameter, looked up per sample in the
    operation's table of parameters (:attr:`tables`, made here once: DALI's own ``magnitude_bin`` route would make
    them inside the pipeline definition, where DALI's AutoGraph rewrites each of the thousands of calls, minutes on a
    CPU).

    Raises:
        ConfigError: the policy holds an operation DALI has no counterpart of (named).
    """

    def __init__(self, policy, input_size: int):
        self.names = [op.name for op in policy.ops]
        missing = [name for name in self.names if name not in RAND_AUGMENT_OPS]
        if missing:
            raise ConfigError(f"--aa: RandAugment's {missing[0]} has no DALI counterpart in mae_fast; use "
                              "--data_backend torch, or a policy without it (the default rand-m9-mstd0.5-inc1 has "
                              "none)")
        self.num_layers = policy.num_layers
        self.weights = None if policy.choice_weights is None else np.asarray(policy.choice_weights, dtype=np.float64)
        self.prob = np.array([op.prob for op in policy.ops], dtype=np.float64)
        self.magnitude = np.array([op.magnitude for op in policy.ops], dtype=np.float64)
        self.magnitude_std = np.array([op.magnitude_std for op in policy.ops], dtype=np.float64)
        self.upper = np.array([op.magnitude_max or LEVEL_DENOM for op in policy.ops], dtype=np.float64)
        self.fill = policy.ops[0].kwargs.get("fillcolor", (128, 128, 128))
        self.input_size = input_size
        num_bins = int(round(self.upper.max() * BINS_PER_LEVEL)) + 1
        # Row 2 * bin + negated: the parameter at level bin / BINS_PER_LEVEL, negated or not (for the operations timm
        # negates; the others have equal rows).
        levels = np.repeat(np.arange(num_bins) / BINS_PER_LEVEL, 2) * np.tile([1.0, -1.0], num_bins)
        self.tables = []
        for op in policy.ops:
            dali_name, negate, rule = RAND_AUGMENT_OPS[op.name]
            self.tables.append(None if rule is None else np.stack([
                _dali_param(dali_name, rule(level if negate else abs(level), op.hparams)) for level in levels]))

    @property
    def identity(self) -> int:
        """The operation index of a layer that was not applied."""
        return len(self.names)

    def draw(self, seeds) -> dict[str, np.ndarray]:
        """Each slot's layers, drawn from its seed as timm's ``RandAugment`` draws them.

        Returns:
            ``{"ra_op", "ra_param"}``, int32 [B, num_layers] each: the operation (:attr:`identity` where the layer is
            skipped: probability ``1 - prob``) and its row of the operation's table: ``2 * bin + negated``, with
            the level ``bin / BINS_PER_LEVEL`` (``m``, or with ``mstd`` drawn around it and clipped to [0, ``mmax``
            or 10]) and ``negated`` 0 or 1 with probability 1/2.
        """
        n, count = self.num_layers, len(self.names)
        u = slot_uniforms(stream_seeds(seeds, RAND_AUGMENT_STREAM), 5 * n).reshape(-1, n, 5)
        if self.weights is None:  # uniform, with replacement
            ops = np.minimum((u[..., 0] * count).astype(np.int64), count - 1)
        else:  # timm draws weighted choices without replacement: one at a time, among those left
            ops = np.empty(u.shape[:2], dtype=np.int64)
            left = np.broadcast_to(self.weights, (u.shape[0], count)).copy()
            for k in range(n):
                cdf = np.cumsum(left / left.sum(axis=1, keepdims=True), axis=1)
                ops[:, k] = np.minimum((u[:, k, 0][:, None] >= cdf).sum(axis=1), count - 1)
                left[np.arange(len(ops)), ops[:, k]] = 0
        magnitude, std = self.magnitude[ops], self.magnitude_std[ops]
        gauss = np.sqrt(-2 * np.log1p(-u[..., 2])) * np.cos(2 * math.pi * u[..., 3])  # Box-Muller
        noisy = magnitude + np.where(np.isinf(std), 0.0, std) * gauss
        level = np.where(np.isinf(std), u[..., 2] * magnitude, noisy)  # timm: mstd above 100 means uniform in [0, m]
        level = np.clip(level, 0, self.upper[ops])
        applied = u[..., 1] <= self.prob[ops]  # timm skips a layer when random() > prob
        negated = u[..., 4] > 0.5
        return {"ra_op": np.where(applied, ops, self.identity).astype(np.int32),
                "ra_param": (2 * np.round(level * BINS_PER_LEVEL) + negated).astype(np.int32)}

    def operations(self) -> list:
        """The policy's operations, then the identity, as functions ``(images, ra_params, shape, fill_value,
        interp_type) -> images`` for ``auto_aug.core.select``: the body of DALI's augmentation of each, given its own
        entry of ``ra_params``. They are plain Python around DALI operators without a condition, so DALI's AutoGraph
        is told to leave them as they are: it rewrites every function it meets at every call, which for
        ``auto_aug``'s ``Augmentation`` wrappers made the pipeline's definition take half a minute on a CPU."""
        from nvidia.dali.auto_aug import augmentations
        from nvidia.dali.pipeline import do_not_convert

        bodies = [getattr(augmentations, RAND_AUGMENT_OPS[name][0]).op for name in self.names]
        return [do_not_convert(functools.partial(_apply_operation, body, k))
                for k, body in enumerate(bodies + [augmentations.identity.op])]

    def graph(self, images, device: str):
        """RandAugment on ``images`` (uint8 HWC batches of ``input_size`` on ``device``) in a pipeline being
        defined."""
        from nvidia.dali import fn, types
        from nvidia.dali.auto_aug import augmentations
        from nvidia.dali.auto_aug.core import select

        ops = self.operations()
        op = fn.external_source(name="ra_op", dtype=types.INT32, ndim=1)
        rows = fn.external_source(name="ra_param", dtype=types.INT32, ndim=1)
        # Parameters that DALI's operations take as named arguments stay on the CPU; the others (sharpness' kernel,
        # posterize's mask, solarize's threshold, used in arithmetic with the pixels) go where the pixels are.
        tables = [None if table is None else types.Constant(
            table, device=device if getattr(augmentations, RAND_AUGMENT_OPS[name][0]).param_device == "auto"
            else "cpu") for name, table in zip(self.names, self.tables)]
        gray = int(round(sum(self.fill) / len(self.fill)))  # DALI's warps fill with one value
        for k in range(self.num_layers):
            params = [None if table is None else table[rows[k]] for table in tables] + [None]
            images = select(ops, op[k], images, ra_params=params, shape=[self.input_size, self.input_size],
                            fill_value=gray, interp_type=types.INTERP_LINEAR)
        return images


# ---------------------------------------------------------------------------------------------- color jitter


class DaliColorJitter:
    """torchvision's ``ColorJitter(c, c, c)`` (timm's, with ``--aa none``): brightness, contrast and saturation
    factors uniform in ``[max(0, 1 - c), 1 + c]``, applied in a random order, by DALI's PIL-like operations."""

    def __init__(self, brightness, contrast, saturation):
        self.ranges = np.array([brightness, contrast, saturation], dtype=np.float64)  # [3, 2]: (low, high) each

    def draw(self, seeds) -> dict[str, np.ndarray]:
        """``{"jitter_order": int32 [B, 3] (a permutation of 0 brightness, 1 contrast, 2 saturation),
        "jitter": float32 [B, 3] (the three factors)}``, from each slot's seed."""
        u = slot_uniforms(stream_seeds(seeds, JITTER_STREAM), 6)
        order = np.argsort(u[:, :3], axis=1, kind="stable").astype(np.int32)
        low, high = self.ranges[:, 0], self.ranges[:, 1]
        return {"jitter_order": order, "jitter": (low + (high - low) * u[:, 3:]).astype(np.float32)}

    def graph(self, images):
        from nvidia.dali import fn, types
        from nvidia.dali.auto_aug import augmentations
        from nvidia.dali.auto_aug.core import augmentation, select

        def reading_factor(k: int, body):
            def jitter_op(data, _, jitter):
                return body.op(data, jitter[k])
            return augmentation(jitter_op, name=body.name)

        # DALI's augmentation bodies (PIL's enhance operations), each reading its factor from the fed ones.
        ops = [reading_factor(k, body)
               for k, body in enumerate((augmentations.brightness, augmentations.contrast, augmentations.color))]
        order = fn.external_source(name="jitter_order", dtype=types.INT32, ndim=1)
        factors = fn.external_source(name="jitter", dtype=types.FLOAT, ndim=1)
        for k in range(3):
            images = select(ops, order[k], images, jitter=factors)
        return images


# ---------------------------------------------------------------------------------------------- random erasing


class DaliErasing:
    """timm's ``RandomErasing`` (``erasing``: its probability, areas, aspect range, counts and mode) on normalized
    CHW float batches of ``input_size``, by ``fn.erase`` with each slot's boxes drawn from its seed."""

    def __init__(self, erasing, input_size: int, seed: int):
        self.probability, self.mode = erasing.probability, erasing.mode
        self.min_area, self.max_area = erasing.min_area, erasing.max_area
        self.log_aspect = erasing.log_aspect_ratio
        self.min_count, self.max_count = erasing.min_count, erasing.max_count
        self.input_size, self.seed = input_size, seed

    def draw(self, seeds) -> dict:
        """Each slot's erased boxes, drawn as timm draws them: with probability ``probability`` an image gets a
        count in ``[min_count, max_count]`` of boxes, each the first of ten tries (area fraction uniform in
        ``[min_area, max_area] / count``, log aspect uniform) that fits strictly inside, at a uniform position.

        Returns:
            ``{"erase_anchor_k", "erase_shape_k"}`` for each box ``k < max_count``: per slot a float32 array of
            (top, left) and (height, width), empty where the slot has no ``k``-th box; with mode ``rand``,
            ``"erase_fill_k"`` float32 [3] normal values; with ``pixel``, ``"erase_noise"`` the slot's (top, left)
            window in the noise bank.
        """
        S, K = self.input_size, self.max_count
        u = slot_uniforms(stream_seeds(seeds, ERASING_STREAM), 4 + K * 28)
        B = len(u)
        erased = u[:, 0] <= self.probability  # timm skips when random() > probability
        span = self.max_count - self.min_count + 1
        count = self.min_count + np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
        out: dict = {}
        for k in range(K):
            box = u[:, 4 + 28 * k: 4 + 28 * (k + 1)]
            area = S * S * (self.min_area + (self.max_area - self.min_area) * box[:, :10]) / count[:, None]
            aspect = np.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * box[:, 10:20])
            h, w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
            fits = (h < S) & (w < S)
            first = fits.argmax(axis=1)
            h, w = h[np.arange(B), first], w[np.arange(B), first]
            top = np.floor(box[:, 20] * (S - h + 1))
            left = np.floor(box[:, 21] * (S - w + 1))
            present = erased & (k < count) & fits.any(axis=1)
            out[f"erase_anchor_{k}"] = [np.array([t, l], np.float32) if p else np.zeros(0, np.float32)
                                        for t, l, p in zip(top, left, present)]
            out[f"erase_shape_{k}"] = [np.array([a, b], np.float32) if p else np.zeros(0, np.float32)
                                       for a, b, p in zip(h, w, present)]
            if self.mode == "rand":
                normal = np.sqrt(-2 * np.log1p(-box[:, 22:25])) * np.cos(2 * math.pi * box[:, 25:28])
                out[f"erase_fill_{k}"] = normal.astype(np.float32)
        if self.mode == "pixel":
            out["erase_noise"] = np.floor(u[:, 2:4] * (NOISE_BANK_MARGIN + 1)).astype(np.float32)
        return out

    def noise_bank(self) -> np.ndarray:
        """float32 [3, S + margin, S + margin] standard normal values, the same for a run's seed."""
        side = self.input_size + NOISE_BANK_MARGIN
        return np.random.default_rng([self.seed, ERASING_STREAM]).standard_normal((3, side, side), dtype=np.float32)

    def graph(self, images, device: str):
        from nvidia.dali import fn, types

        boxes = [(fn.external_source(name=f"erase_anchor_{k}", dtype=types.FLOAT, ndim=1),
                  fn.external_source(name=f"erase_shape_{k}", dtype=types.FLOAT, ndim=1))
                 for k in range(self.max_count)]
        where = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
        if self.mode == "rand":
            for k, (anchor, shape) in enumerate(boxes):
                fill = fn.external_source(name=f"erase_fill_{k}", dtype=types.FLOAT, ndim=1)
                images = fn.erase(images, anchor=anchor, shape=shape, fill_value=fill, **where)
            return images
        if self.mode != "pixel":  # const: zeros, the mean color once normalized
            for anchor, shape in boxes:
                images = fn.erase(images, anchor=anchor, shape=shape, fill_value=0.0, **where)
            return images
        keep = images * 0.0 + 1.0  # 1 outside the boxes, 0 inside
        for anchor, shape in boxes:
            keep = fn.erase(keep, anchor=anchor, shape=shape, fill_value=0.0, **where)
        bank = types.Constant(self.noise_bank(), layout="CHW", device=device)
        offset = fn.external_source(name="erase_noise", dtype=types.FLOAT, ndim=1)
        window = types.Constant(np.array([self.input_size] * 2, dtype=np.float32), device="cpu")
        noise = fn.slice(bank, offset, window, **where)
        return images * keep + noise * (1.0 - keep)


# ---------------------------------------------------------------------------------------------- the pipelines


class FinetuneTrainPipeline:
    """The fine-tuning training pipeline (see the module): built once per run by the
    :class:`~mae_fast.data.dali_loader.DaliLoader`, fed each batch's encoded images and their slots' draws.

    Built from the ``torch`` backend's timm objects: ``primary`` (random resized crop and flip), ``secondary``
    (RandAugment or color jitter, or nothing) and ``erasing`` (timm's ``RandomErasing``, or None).

    Raises:
        ConfigError: a ``--aa`` policy other than RandAugment (``rand-...``) or none, or a RandAugment operation DALI
            has no counterpart of.
    """

    def __init__(self, primary, secondary, erasing, input_size: int, seed: int):
        from timm.data.auto_augment import RandAugment
        from torchvision import transforms

        crop = primary.transforms[0]
        flips = [t.p for t in primary.transforms[1:] if isinstance(t, transforms.RandomHorizontalFlip)]
        if len(flips) != len(primary.transforms) - 1 or len(flips) > 1:
            raise ConfigError(f"--data_backend dali: the training transform must be timm's crop and flip (got "
                              f"{primary}); use --data_backend torch")
        self.flip_p = flips[0] if flips else 0.0  # --hflip; timm leaves the flip out at 0
        self.scale, self.ratio = tuple(crop.scale), tuple(crop.ratio)
        self.input_size, self.seed = input_size, seed
        self.rand_augment = self.jitter = None
        for transform in secondary.transforms:
            if isinstance(transform, RandAugment):
                self.rand_augment = DaliRandAugment(transform, input_size)
            elif isinstance(transform, transforms.ColorJitter):
                self.jitter = DaliColorJitter(*(value if value is not None else (1.0, 1.0)
                                                for value in (transform.brightness, transform.contrast,
                                                              transform.saturation)))
            else:
                raise ConfigError(f"--aa: the dali backend runs RandAugment policies (rand-...) and none, not "
                                  f"{type(transform).__name__}; use --data_backend torch for that policy")
        self.erasing = DaliErasing(erasing, input_size, seed) if erasing is not None else None

    def build(self, batch_size: int, device_id: int | None, num_threads: int):
        """The built pipeline: inputs ``"encoded"``, the crop's ``"anchor"``/``"shape"``/``"mirror"`` and each
        stage's draws; output float32 [B, 3, S, S], normalized (and erased)."""
        from nvidia.dali import fn, pipeline_def, types

        from mae_fast.data.dali_loader import PREFETCH_DEPTH

        decoder = "mixed" if device_id is not None else "cpu"
        S = self.input_size

        # Conditionals (auto_aug's per-sample choice of operation) make DALI rewrite the definition with AutoGraph,
        # seconds on a CPU: only when a stage chooses.
        choosing = self.rand_augment is not None or self.jitter is not None

        @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=self.seed,
                      prefetch_queue_depth=PREFETCH_DEPTH, enable_conditionals=choosing)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                             adjust_orientation=False, normalized_anchor=False,
                                             normalized_shape=False)
            images = fn.resize(images, size=[S, S], interp_type=types.INTERP_CUBIC)  # antialiased, as Pillow's
            images = fn.flip(images, horizontal=mirror)  # before RandAugment, as timm
            if self.rand_augment:
                images = self.rand_augment.graph(images, "gpu" if device_id is not None else "cpu")
            if self.jitter:
                images = self.jitter.graph(images)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[m * 255 for m in IMAGENET_MEAN],
                                              std=[s * 255 for s in IMAGENET_STD])
            if self.erasing:
                images = self.erasing.graph(images, "gpu" if device_id is not None else "cpu")
            return images

        pipeline = pipe()
        pipeline.build()
        return pipeline

    def draws(self, arrays: list, seeds) -> dict:
        """Everything the pipeline is fed for one batch besides the encoded images, drawn from the slots' seeds."""
        sizes = [image_size(array) or (1, 1) for array in arrays]
        seeds = np.asarray(seeds, dtype=np.int64)
        boxes, flips, _ = train_crops([w for w, _ in sizes], [h for _, h in sizes], seeds, self.scale, self.ratio,
                                      self.flip_p)
        fed = {"anchor": boxes[:, :2].astype(np.float32), "shape": boxes[:, 2:].astype(np.float32),
               "mirror": flips.astype(np.int32)}
        for stage in (self.rand_augment, self.jitter, self.erasing):
            if stage is not None:
                fed.update(stage.draw(seeds))
        return fed

    def feed(self, pipeline, arrays: list, seeds) -> None:
        pipeline.feed_input("encoded", arrays)
        for name, values in self.draws(arrays, seeds).items():
            pipeline.feed_input(name, values)


class FinetuneEvalPipeline:
    """The official evaluation transform on DALI (see the module): the shorter side resized to
    ``int(input_size / 0.875)``, center crop, normalized; the sizes and offsets torchvision's ``Resize`` and
    ``CenterCrop`` give, computed from each image's header (an image whose header tells no size is taken as
    square)."""

    def __init__(self, input_size: int):
        self.input_size = input_size

    def build(self, batch_size: int, device_id: int | None, num_threads: int):
        from nvidia.dali import fn, pipeline_def, types

        from mae_fast.data.dali_loader import PREFETCH_DEPTH

        decoder = "mixed" if device_id is not None else "cpu"
        S = self.input_size

        @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=0,
                      prefetch_queue_depth=PREFETCH_DEPTH)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC)
            window = types.Constant(np.array([S, S], dtype=np.float32), device="cpu")
            images = fn.slice(images, anchor, window, axis_names="HW",
                              normalized_anchor=False, normalized_shape=False)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in IMAGENET_MEAN],
                                            std=[s * 255 for s in IMAGENET_STD])

        pipeline = pipe()
        pipeline.build()
        return pipeline

    def feed(self, pipeline, arrays: list, seeds) -> None:
        sizes, anchors = [], []
        for array in arrays:
            width, height = image_size(array) or (self.input_size,) * 2
            new_w, new_h, left, top = eval_geometry(width, height, self.input_size)
            sizes.append(np.array([new_h, new_w], dtype=np.float32))
            anchors.append(np.array([top, left], dtype=np.float32))
        pipeline.feed_input("encoded", arrays)
        pipeline.feed_input("size", sizes)
        pipeline.feed_input("anchor", anchors)
