"""What a Byzantine peer sends instead of its honest update: one registry, two users.

The simulator's Byzantine peers and the live malicious peer process (``p2pfm attack``) forge
their updates with the same functions, so a defence measured in the simulator is the defence
replayed against real processes. Each attack maps the attacker's honest pseudo-gradient (and,
for the omniscient ones, the mean of the honest updates it can see) to the vector it sends.

Update attacks (the vector sent; rounds, states and floods are protocol-level and live in
the drivers):

- ``sign_flip``           ``-scale * honest`` (gradient ascent).
- ``scaling``             ``factor * honest`` (one loud voice).
- ``noise``               Gaussian noise with ``scale`` times the honest update's RMS.
- ``constant_direction``  the same fixed unit direction every round, ``scale`` x ``||honest||``.
- ``free_rider``          zeros: claims work, does none.
- ``nan``                 NaN entries (refused by the codec; shows the refusal path).

Pure numpy; seeded by the caller's generator. :func:`forge_wire` also encodes the forged
vector with the sender's codec, as both drivers send it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from p2pfm.core.codecs import CodecSpec, encode


@dataclass(frozen=True)
class AttackSpec:
    """Which attack and its strength (``scale``: the attack's one knob, see each attack)."""

    name: str = "sign_flip"
    scale: float = 1.0


Forge = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _sign_flip(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    return (-scale * honest).astype(np.float32)


def _scaling(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    return (scale * honest).astype(np.float32)


def _noise(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(honest, dtype=np.float64)))) if honest.size else 0.0
    return (rng.standard_normal(honest.size) * scale * max(rms, 1e-8)).astype(np.float32)


def _constant_direction(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    # A direction fixed for the whole run (seeded by the size alone), so the pushes add up.
    direction = np.random.default_rng(honest.size).standard_normal(honest.size)
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    magnitude = scale * max(float(np.linalg.norm(honest)), 1e-8)
    return (direction * magnitude).astype(np.float32)


def _free_rider(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    return np.zeros_like(honest, dtype=np.float32)


def _nan(honest: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    forged = honest.astype(np.float32).copy()
    forged[:: max(1, forged.size // 16)] = np.nan
    return forged


UPDATE_ATTACKS: dict[str, Forge] = {
    "sign_flip": _sign_flip,
    "scaling": _scaling,
    "noise": _noise,
    "constant_direction": _constant_direction,
    "free_rider": _free_rider,
    "nan": _nan,
}
"""Attack name -> forge(honest, scale, rng). Default strengths: see :data:`DEFAULT_SCALE`."""

DEFAULT_SCALE: dict[str, float] = {
    "sign_flip": 4.0,
    "scaling": 100.0,
    "noise": 10.0,
    "constant_direction": 10.0,
    "free_rider": 1.0,
    "nan": 1.0,
}


def forge_update(spec: AttackSpec, honest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The vector a Byzantine peer sends in place of ``honest`` (a flat float32 delta)."""
    try:
        forge = UPDATE_ATTACKS[spec.name]
    except KeyError:
        raise ValueError(f"unknown attack {spec.name!r}; known: {', '.join(UPDATE_ATTACKS)}") from None
    return forge(np.asarray(honest, dtype=np.float32), spec.scale, rng)


_NAN_F32 = np.array([np.nan], dtype="<f4").tobytes()
_NAN_F16 = np.array([np.nan], dtype="<f2").tobytes()


def poison_wire(wire: dict) -> dict:
    """A copy of a codec wire map whose first float is NaN: well formed in every other way.

    The encoder refuses NaN (a local bug, never sent), so a NaN attacker writes the bytes
    itself; every receiver's decode must refuse the result (``NON_FINITE``). The float field
    is the int8 scales where there are any, else the fp32 or fp16 values.
    """
    poisoned = dict(wire)
    if "scales" in poisoned:
        name, nan = "scales", _NAN_F32
    elif poisoned.get("codec") == "fp16" or poisoned.get("value_bits") == 16:
        name, nan = "values", _NAN_F16
    else:
        name, nan = "values", _NAN_F32
    data = poisoned[name]
    if len(data) < len(nan):
        raise ValueError(f"wire field {name!r} holds no float to poison")
    poisoned[name] = nan + data[len(nan) :]
    return poisoned


def forge_wire(spec: AttackSpec, honest: np.ndarray, codec: CodecSpec, rng: np.random.Generator) -> dict:
    """The codec wire map a Byzantine peer sends in place of ``honest``, encoded with ``codec``.

    A forged vector the encoder refuses (NaN/Inf: ``nan``) is sent as the honest vector's
    encoding with a NaN written into its bytes (:func:`poison_wire`), so receivers see it.
    """
    forged = forge_update(spec, honest, rng)
    if np.isfinite(forged).all():
        return encode(forged, codec)
    return poison_wire(encode(np.nan_to_num(forged, nan=0.0, posinf=0.0, neginf=0.0), codec))
