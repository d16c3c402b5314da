"""Strict payload schemas, one per message kind.

A schema is a tree of small spec objects (:class:`Int`, :class:`Float`, :class:`Str`,
:class:`Bytes`, :class:`Bool`, :class:`List`, :class:`Map`, :class:`AnyMap`). Checking a
decoded payload walks the tree and raises :class:`SchemaViolation` naming the field path and
the problem. Non-finite floats are remembered during the walk and raised as
:class:`NonFinite` only once the structure is known to be sound, so a message with both
kinds of fault is always refused for its structure first (the order ``protocols/wire.md``
documents).

:data:`KIND_SCHEMAS` maps each message kind to its payload :class:`Map`; add a kind with
:func:`register_kind`. The tables in ``protocols/wire.md`` describe the same schemas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pfm.core.errors import NonFinite, SchemaViolation

INT64_MAX = 2**63 - 1
"""Default upper bound for integers: every peer (and numpy) can hold it in an int64."""


@dataclass
class _Walk:
    """State of one validation walk: opaque-node budget and the first non-finite float seen."""

    max_depth: int
    max_opaque_items: int
    opaque_items: int = 0
    non_finite: str | None = None

    def note_float(self, value: float, path: str) -> bool:
        """Record a NaN/Inf at ``path`` (first one wins); True if the value is finite."""
        if math.isfinite(value):
            return True
        if self.non_finite is None:
            self.non_finite = f"{path}: {value!r} is not a finite number"
        return False


def _type_name(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


class Spec:
    """One node of a schema: ``check`` raises SchemaViolation, or records a non-finite float."""

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description used in wire.md tables and error messages."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (msgpack int, never bool) in ``[min, max]``."""

    min: int = 0
    max: int = INT64_MAX

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaViolation(f"{path}: expected int, got {_type_name(value)}")
        if not self.min <= value <= self.max:
            raise SchemaViolation(f"{path}: {value} outside [{self.min}, {self.max}]")

    def describe(self) -> str:
        upper = "" if self.max == INT64_MAX else f" <= {self.max}"
        return f"int >= {self.min}{upper}"


@dataclass(frozen=True)
class Float(Spec):
    """A finite float64 (msgpack float) within optional bounds; NaN/Inf -> NonFinite."""

    min: float | None = None
    max: float | None = None

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, float):
            raise SchemaViolation(f"{path}: expected float, got {_type_name(value)}")
        if not walk.note_float(value, path):
            return  # bounds mean nothing for NaN; NonFinite is raised after the walk
        if self.min is not None and value < self.min:
            raise SchemaViolation(f"{path}: {value!r} is below the minimum {self.min!r}")
        if self.max is not None and value > self.max:
            raise SchemaViolation(f"{path}: {value!r} is above the maximum {self.max!r}")

    def describe(self) -> str:
        bounds = [f">= {self.min!r}"] if self.min is not None else []
        bounds += [f"<= {self.max!r}"] if self.max is not None else []
        return " ".join(["finite float", *bounds])


@dataclass(frozen=True)
class Str(Spec):
    """A UTF-8 string of at most ``max_len`` characters."""

    max_len: int

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, str):
            raise SchemaViolation(f"{path}: expected str, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise SchemaViolation(f"{path}: string of {len(value)} chars exceeds {self.max_len}")

    def describe(self) -> str:
        return f"str <= {self.max_len} chars"


@dataclass(frozen=True)
class Bytes(Spec):
    """A msgpack bin of exactly ``length`` bytes, or at most ``max_len`` bytes."""

    length: int | None = None
    max_len: int | None = None

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, bytes):
            raise SchemaViolation(f"{path}: expected bytes, got {_type_name(value)}")
        if self.length is not None and len(value) != self.length:
            raise SchemaViolation(f"{path}: expected exactly {self.length} bytes, got {len(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaViolation(f"{path}: {len(value)} bytes exceeds {self.max_len}")

    def describe(self) -> str:
        if self.length is not None:
            return f"bytes ({self.length})"
        return "bytes" if self.max_len is None else f"bytes <= {self.max_len}"


@dataclass(frozen=True)
class Bool(Spec):
    """A msgpack bool (true/false), never an int."""

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, bool):
            raise SchemaViolation(f"{path}: expected bool, got {_type_name(value)}")

    def describe(self) -> str:
        return "bool"


@dataclass(frozen=True)
class List(Spec):
    """A msgpack array of at most ``max_len`` items, each matching ``item``."""

    item: Spec
    max_len: int

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, list):
            raise SchemaViolation(f"{path}: expected list, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise SchemaViolation(f"{path}: list of {len(value)} items exceeds {self.max_len}")
        if depth + 1 > walk.max_depth:
            raise SchemaViolation(f"{path}: nesting deeper than {walk.max_depth}")
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]", walk, depth + 1)

    def describe(self) -> str:
        return f"list[{self.item.describe()}] <= {self.max_len}"


@dataclass(frozen=True)
class Map(Spec):
    """A msgpack map with exactly these string keys (those in ``optional`` may be absent)."""

    fields: Mapping[str, Spec]
    optional: frozenset[str] = field(default_factory=frozenset)

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, dict):
            raise SchemaViolation(f"{path}: expected map, got {_type_name(value)}")
        if depth + 1 > walk.max_depth:
            raise SchemaViolation(f"{path}: nesting deeper than {walk.max_depth}")
        if value.keys() != self.fields.keys():  # exactly the fields: nothing extra, nothing missing
            extra = [k for k in value if k not in self.fields]
            if extra:
                raise SchemaViolation(f"{path}: unexpected field {_first_key(extra)}")
            missing = [k for k in self.fields if k not in value and k not in self.optional]
            if missing:
                raise SchemaViolation(f"{path}.{missing[0]}: missing field")
        for name, spec in self.fields.items():
            if name in value:
                spec.check(value[name], f"{path}.{name}", walk, depth + 1)

    def describe(self) -> str:
        return "map"


_LEAF_TYPES = (bool, int, str, bytes)
"""Opaque-map values with nothing inside to check (floats are leaves too, but may be NaN)."""


@dataclass(frozen=True)
class AnyMap(Spec):
    """An opaque map (e.g. a codec's tensor dict) checked only for shape and size.

    Keys must be strings; values may be nil, bool, int, finite float, str, bytes, lists and
    maps, nested no deeper than the walk's depth limit and with at most ``max_opaque_items``
    nodes in all. Its meaning is validated later by its owner (``p2pfm.core.codecs.decode``).
    """

    def check(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        if not isinstance(value, dict):
            raise SchemaViolation(f"{path}: expected map, got {_type_name(value)}")
        self._walk(value, path, walk, depth)

    def _walk(self, value: Any, path: str, walk: _Walk, depth: int) -> None:
        walk.opaque_items += 1
        if walk.opaque_items > walk.max_opaque_items:
            raise SchemaViolation(f"{path}: opaque map has more than {walk.max_opaque_items} items")
        if value is None or isinstance(value, _LEAF_TYPES):
            return
        if isinstance(value, float):
            walk.note_float(value, path)
            return
        if depth + 1 > walk.max_depth:
            raise SchemaViolation(f"{path}: nesting deeper than {walk.max_depth}")
        if isinstance(value, list):
            for i, item in enumerate(value):
                self._walk(item, f"{path}[{i}]", walk, depth + 1)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise SchemaViolation(f"{path}: map key {key!r} is not a string")
                if item is None or isinstance(item, _LEAF_TYPES):
                    # What _walk does for a leaf, without building its path (a codec map is all
                    # leaves, and every gossip update carries one): count it, check the budget.
                    walk.opaque_items += 1
                    if walk.opaque_items > walk.max_opaque_items:
                        raise SchemaViolation(
                            f"{path}.{key}: opaque map has more than {walk.max_opaque_items} items"
                        )
                    continue
                self._walk(item, f"{path}.{key}", walk, depth + 1)
            return
        raise SchemaViolation(f"{path}: unsupported type {_type_name(value)}")

    def describe(self) -> str:
        return "opaque map"


def _first_key(keys: list[Any]) -> str:
    key = keys[0]
    return repr(key) if not isinstance(key, str) else key


HASH32 = Bytes(length=32)

MAX_ENERGY_WH = 1e7
"""Announced energy bound: 10 MWh, a 1 kW device training for over a thousand years."""
MAX_TOKENS = 10**15
"""Announced tokens bound: a quadrillion, far beyond any one peer's life."""
MAX_GRID_G_PER_KWH = 2000.0
"""Grid intensity bound: twice the dirtiest grids (coal, ~1000 gCO2e/kWh)."""

KIND_SCHEMAS: dict[str, Map] = {}
"""Payload schema of every known message kind; extend with :func:`register_kind`."""


def register_kind(kind: str, schema: Map) -> None:
    """Add a message kind. Kinds are short ASCII names without NUL (they enter the signed prefix)."""
    if not kind or len(kind) > 64 or not kind.isascii() or "\x00" in kind:
        raise ValueError(f"kind {kind!r}: must be 1-64 ASCII characters without NUL")
    if kind in KIND_SCHEMAS:
        raise ValueError(f"kind {kind!r} is already registered")
    if not isinstance(schema, Map):
        raise TypeError(f"kind {kind!r}: schema must be a Map, got {type(schema).__name__}")
    KIND_SCHEMAS[kind] = schema


register_kind(
    "update",
    Map(
        {
            "tensor": AnyMap(),  # codec dict, validated by p2pfm.core.codecs.decode after this
            "weight": Float(min=0.0),  # samples this update represents
            "inner_steps": Int(),
            "train_loss": Float(),
            "model_hash": HASH32,
        }
    ),
)
register_kind(
    "announce",
    Map(
        {
            "libp2p_id": Str(128),
            "maddrs": List(Str(256), 16),
            "round": Int(),
            "model_hash": HASH32,
            "device_class": Str(64),
            "power_w": Float(min=0.0),
            "state_bytes": Int(),
            # libp2p ids of the peers the sender sees (newest first): the start-up quorum's
            # handshake, see p2pfm.core.quorum. Optional: older announcements omit it.
            "sees": List(Str(128), 64),
            # The swarm authority's certificate for the sender (p2pfm.core.admission); absent
            # in an open swarm. Readers of an admitted swarm keep only announcements whose
            # certificate admits their signer.
            "cert": Bytes(max_len=512),
            # The sender's energy totals since its process started (p2pfm.energy): attributable and
            # marginal Wh, trained tokens, the meter's source, its grid intensity. Optional (older
            # peers omit them); bounded so that one claim cannot swamp a swarm's report.
            "energy_wh": Float(min=0.0, max=MAX_ENERGY_WH),
            "marginal_wh": Float(min=0.0, max=MAX_ENERGY_WH),
            "tokens": Int(max=MAX_TOKENS),
            "energy_source": Str(32),
            "grid_g_per_kwh": Float(min=0.0, max=MAX_GRID_G_PER_KWH),
            # Present while the sender's energy policy pauses it (p2pfm.core.policy): why, in a
            # few words. Readers do not choose a paused peer as partner or donor, nor count it
            # for the quorum. Optional: a training peer omits it.
            "paused": Str(64),
        },
        optional=frozenset(
            {
                "sees",
                "cert",
                "energy_wh",
                "marginal_wh",
                "tokens",
                "energy_source",
                "grid_g_per_kwh",
                "paused",
            }
        ),
    ),
)
register_kind(
    "state_manifest",
    Map(
        {
            "round": Int(),
            "model_hash": HASH32,
            "total_bytes": Int(),
            "chunk_size": Int(min=1),
            "chunk_hashes": List(HASH32, 65536),
            # lane: the donor's offer of a direct, sealed TCP lane for the chunks (p2pfm.core.lane),
            # only in answer to a request that asked for one. Optional.
            "lane": Map({"port": Int(min=1, max=65535), "secret": Bytes(length=32)}),
        },
        optional=frozenset({"lane"}),
    ),
)
register_kind(
    "state_request",
    Map(
        # cert: the asker's certificate (p2pfm.core.admission), so that a donor that has not read
        # the asker's announcement yet can still tell a member from a stranger. Optional.
        # want: resume a download (p2pfm.core.transfer.wanted_chunks): only these chunk ranges
        # [start, stop) of the state whose hash is model_hash. Optional; bounded here.
        # lane: the asker can take the chunks on a direct, sealed TCP lane (p2pfm.core.lane). Optional.
        {
            "round": Int(),
            "nonce": Bytes(length=16),
            "cert": Bytes(max_len=512),
            "want": Map({"model_hash": HASH32, "ranges": List(List(Int(), 2), 256)}),
            "lane": Bool(),
        },
        optional=frozenset({"cert", "want", "lane"}),
    ),
)
register_kind(
    "params_sync",
    Map(
        {
            "tensor": AnyMap(),  # codec dict of (params - initial params), validated by codecs.decode
            "round": Int(),  # the donor's round
            "nonce": Bytes(
                length=16
            ),  # echoes the request's nonce: an answer cannot be replayed to another ask
        }
    ),
)


def validate_payload(kind: str, payload: Any, *, max_depth: int = 8, max_opaque_items: int = 4096) -> None:
    """Check ``payload`` against the schema of ``kind``.

    Raises SchemaViolation (structure, types, bounds; paths start at ``payload``), then
    NonFinite (first NaN/Inf found) only if the structure is sound. ``kind`` must be
    registered: an unknown kind is the caller's check (UnknownKind), so here it is a KeyError.
    """
    schema = KIND_SCHEMAS[kind]
    walk = _Walk(max_depth=max_depth, max_opaque_items=max_opaque_items)
    schema.check(payload, "payload", walk, 0)
    if walk.non_finite is not None:
        raise NonFinite(walk.non_finite)
