"""ModelConfig: the static description of a Llama / Mistral / Qwen2 / Qwen3 decoder.

A frozen dataclass, hashable, so it can be a static argument of `jax.jit`. Built from a
Hugging Face `config.json` (transformers v4 and v5 spellings) and round-tripped to json
next to a converted checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any

from .. import checks

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("llama3", "linear")


class ConfigError(ValueError):
    """A config.json that cannot describe a model this package runs."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling: "llama3" (Llama-3.x frequency-dependent NTK-by-parts, all fields) or
    "linear" (position interpolation: every frequency divided by `factor`)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"  # checkpoints written before "linear" existed are llama3

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope_type {self.rope_type!r}; "
                              f"implemented: {', '.join(ROPE_TYPES)}")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_number(f"rope_scaling {name}", getattr(self, name), positive=True)
        if not _is_int(self.original_max_position_embeddings) or (
                self.original_max_position_embeddings <= 0):
            raise ConfigError(f"rope_scaling original_max_position_embeddings must be a "
                              f"positive integer, got {self.original_max_position_embeddings!r}")
        # llama3 divides by (high - low): equal factors would make every frequency NaN
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling high_freq_factor ({self.high_freq_factor}) must be greater "
                f"than low_freq_factor ({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One parameter, declared once: its shape, the logical axis of each dim, and how
    `params.random_params` initialises it.

    Logical axes name what a dim indexes ("vocab", "embed", "q_heads", "kv_heads", "mlp",
    "head_dim", "layer"); `sharding.ShardingRules` maps each to a mesh axis or to none, so
    a param's partition spec follows from this declaration. No dtype: a checkpoint's
    params share one, chosen at conversion.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # "normal": N(0, scale); "near_one": 1 + N(0, 0.1) (norm weights)

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and logical axes {self.axes} differ in rank")
        if self.init not in ("normal", "near_one"):
            raise ValueError(f"init must be 'normal' or 'near_one', got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # biases: q/k/v projections (Qwen2; Llama/Qwen3 `attention_bias`), the output
    # projection (Llama/Qwen3 `attention_bias`, not Qwen2) and the MLP (`mlp_bias`)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: rocketkv-jax runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} decoders"
            )
        for f in dataclasses.fields(self):  # json gives any type; say which key is wrong
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and not (_is_int(value) or (
                    value is None and f.type == "int | None")):
                raise ConfigError(f"config value {f.name} must be an integer, got {value!r}")
            if f.type == "float":
                _check_number(f"config value {f.name}", value)
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"config value {f.name} must be true or false, got {value!r}")
        checks.real(self.rms_norm_eps, "rms_norm_eps", ConfigError, ok=lambda x: x >= 0,
                    rule="a finite number >= 0")
        checks.positive_number(self.rope_theta, "rope_theta", ConfigError)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"config value rope_scaling must be an object or null, got "
                              f"{self.rope_scaling!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        for name in ("max_position_embeddings", "sliding_window"):  # positions are int32
            if (getattr(self, name) or 0) >= checks.COUNT_LIMIT:
                raise ConfigError(f"{name} must be < 2**31 (positions are 32-bit), got "
                                  f"{getattr(self, name)}")
        # a special token outside the embedding would be gathered from a clamped row
        if not isinstance(self.eos_token_ids, tuple):
            raise ConfigError(f"config value eos_token_ids must be a list of token ids, got "
                              f"{self.eos_token_ids!r}")
        named = [("bos_token_id", self.bos_token_id)] * (self.bos_token_id is not None)
        named += [("eos_token_id", e) for e in self.eos_token_ids]
        for name, token in named:
            if not _is_int(token) or not 0 <= token < self.vocab_size:
                raise ConfigError(f"{name} {token!r} is not a token id of the "
                                  f"{self.vocab_size}-token vocabulary")

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read an HF `config.json` dict (Llama or Mistral, transformers v4 or v5)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs!r}; "
                f"rocketkv-jax converts only {', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        experts = cfg.get("num_local_experts") or cfg.get("num_experts")
        if experts:
            raise ConfigError(
                f"mixture-of-experts models are not supported (config.json has {experts} "
                f"experts per layer); rocketkv-jax runs dense decoders only"
            )
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                    "intermediate_size", "vocab_size"):
            if key not in cfg:
                raise ConfigError(f"config.json is missing required key {key!r}")
        hidden = _int_value(cfg, "hidden_size")
        num_heads = _int_value(cfg, "num_attention_heads")
        layers = _int_value(cfg, "num_hidden_layers")
        intermediate = _int_value(cfg, "intermediate_size")
        vocab = _int_value(cfg, "vocab_size")
        num_kv = _int_value(cfg, "num_key_value_heads", num_heads)
        if num_heads <= 0:
            raise ConfigError(f"num_attention_heads must be positive, got {num_heads}")
        head_dim = _int_value(cfg, "head_dim", hidden // num_heads)
        # transformers v5 moved rope_theta / rope_scaling into rope_parameters.
        rope_params = cfg.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise ConfigError(f"config value rope_parameters must be an object, got "
                              f"{rope_params!r}")
        rope_theta = _float_value(rope_params if "rope_theta" in rope_params else cfg,
                                  "rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"config value rope_scaling must be an object or null, got "
                              f"{scaling!r}")
        if rope_params and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        rope_scaling = _parse_rope_scaling(scaling)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        eos_ids = tuple(_int_value({"eos_token_id": e}, "eos_token_id") for e in eos_ids)
        sliding = cfg.get("sliding_window") if model_type == "mistral" else None
        if model_type in ("qwen2", "qwen3") and _bool_value(cfg, "use_sliding_window", False):
            raise ConfigError(
                f"{model_type} config has use_sliding_window=true (layer-wise sliding window "
                f"attention), which rocketkv-jax does not implement; set it to false in "
                f"config.json to run every layer with full attention, as Qwen's released "
                f"models do"
            )
        attention_bias = _bool_value(cfg, "attention_bias", False)
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = model_type != "qwen2" and attention_bias
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=_float_value(cfg, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=_int_value(cfg, "max_position_embeddings", 4096),
            tie_word_embeddings=_bool_value(cfg, "tie_word_embeddings", False),
            rope_scaling=rope_scaling,
            sliding_window=None if sliding is None else _int_value(cfg, "sliding_window"),
            bos_token_id=(None if cfg.get("bos_token_id") is None
                          else _int_value(cfg, "bos_token_id")),
            eos_token_ids=eos_ids,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=_bool_value(cfg, "mlp_bias", False),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory, not a config.json file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid json: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a json object")
        if data.get("rocketkv_config_version") == 1:
            return cls.from_dict(data)
        return cls.from_hf_dict(data)

    # ------------------------------------------------------------ own json form
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rocketkv_config_version"] = 1
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The inverse of `to_dict`; a ConfigError names an unknown, missing or mistyped key."""
        d = {k: v for k, v in d.items() if k != "rocketkv_config_version"}
        _check_keys("config", d, cls)
        scaling = d.get("rope_scaling")
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(f"config value rope_scaling must be an object or null, got "
                                  f"{scaling!r}")
            _check_keys("rope_scaling", scaling, RopeScaling)
            d["rope_scaling"] = RopeScaling(**scaling)
        eos = d.get("eos_token_ids", ())
        if not isinstance(eos, list | tuple):
            raise ConfigError(f"config value eos_token_ids must be a list of token ids, got "
                              f"{eos!r}")
        d["eos_token_ids"] = tuple(eos)
        return cls(**d)

    def param_infos(self) -> dict[str, ArrayInfo]:
        """Every parameter, keyed by its path in the params pytree: shape, logical axes
        (mapped to mesh axes by `sharding.ShardingRules`) and test initialisation.

        Layers are stacked on a leading axis of size `num_layers` (the forward loops
        over them). Linear weights are stored [in, out]; q/k/v/o keep HF's head-major
        H*D and K*D columns, so splitting them in equal chunks splits whole heads.
        """
        E, F, V, Ly = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        A = ArrayInfo
        infos = {
            # vocab-parallel: the two largest params of small models (a tied head is embed.T)
            "embed": A((V, E), ("vocab", "embed")),
            "final_norm": A((E,), ("embed",), "near_one"),
            "layers/attn_norm": A((Ly, E), ("layer", "embed"), "near_one"),
            # column-parallel over heads: q/k/v of a device's heads are computed locally
            "layers/wq": A((Ly, E, H * D), ("layer", "embed", "q_heads")),
            "layers/wk": A((Ly, E, K * D), ("layer", "embed", "kv_heads")),
            "layers/wv": A((Ly, E, K * D), ("layer", "embed", "kv_heads")),
            # row-parallel: each device's heads add a partial sum -> one all-reduce
            "layers/wo": A((Ly, H * D, E), ("layer", "q_heads", "embed")),
            "layers/mlp_norm": A((Ly, E), ("layer", "embed"), "near_one"),
            # MLP: gate/up column-parallel over F, down row-parallel -> one all-reduce
            "layers/w_gate": A((Ly, E, F), ("layer", "embed", "mlp")),
            "layers/w_up": A((Ly, E, F), ("layer", "embed", "mlp")),
            "layers/w_down": A((Ly, F, E), ("layer", "mlp", "embed")),
        }
        # biases follow their weight's output columns; o and down biases are added after
        # the all-reduce, so every device holds them whole
        if self.qkv_bias:
            infos.update({"layers/bq": A((Ly, H * D), ("layer", "q_heads")),
                          "layers/bk": A((Ly, K * D), ("layer", "kv_heads")),
                          "layers/bv": A((Ly, K * D), ("layer", "kv_heads"))})
        if self.o_bias:
            infos["layers/bo"] = A((Ly, E), ("layer", "embed"))
        if self.mlp_bias:
            infos.update({"layers/b_gate": A((Ly, F), ("layer", "mlp")),
                          "layers/b_up": A((Ly, F), ("layer", "mlp")),
                          "layers/b_down": A((Ly, E), ("layer", "embed"))})
        if self.qk_norm:  # Qwen3's per-head q/k RMSNorm weights, shared by every head
            infos.update({"layers/q_norm": A((Ly, D), ("layer", "head_dim"), "near_one"),
                          "layers/k_norm": A((Ly, D), ("layer", "head_dim"), "near_one")})
        if not self.tie_word_embeddings:
            infos["lm_head"] = A((E, V), ("embed", "vocab"))
        return infos

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every parameter, keyed by its path (see `param_infos`)."""
        return {path: info.shape for path, info in self.param_infos().items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(what: str, value: Any, positive: bool = False) -> None:
    """A finite real number (not a bool); `positive`: also > 0 (checks.real's words)."""
    if positive:
        checks.positive_number(value, what, ConfigError)
    else:
        checks.real(value, what, ConfigError, ok=lambda x: True, rule="a finite number")


def _check_keys(what: str, d: dict[str, Any], cls: type) -> None:
    """`d` holds exactly the keys of dataclass `cls` that have no default, and no others."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, d.keys() - fields.keys()))
    if unknown:
        raise ConfigError(f"{what} has unknown key(s) {', '.join(unknown)}")
    missing = [name for name, f in fields.items() if name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{what} is missing key(s) {', '.join(missing)}")


def _bool_value(cfg: dict[str, Any], key: str, default: bool) -> bool:
    """cfg[key] as true/false; a missing or null key gives `default`. Never bool("false")."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config value {key} must be true or false, got {value!r}")
    return value


def _int_value(cfg: dict[str, Any], key: str, default: int | None = None,
               where: str = "config value") -> int:
    """cfg[key] as an int (a whole float such as 4096.0 too); a missing or null key gives
    `default`; anything else is a ConfigError naming the key (after `where`)."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not _is_int(value):
        raise ConfigError(f"{where} {key} must be an integer, got {value!r}")
    return value


def _float_value(cfg: dict[str, Any], key: str, default: float,
                 where: str = "config value") -> float:
    value = cfg.get(key)
    if value is None:
        return default
    _check_number(f"{where} {key}", value)
    return float(value)


def _parse_rope_scaling(scaling: dict[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    where = "rope_scaling"
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling type {kind!r}: implemented are "
            f"{', '.join(ROPE_TYPES)}; 'dynamic' and 'yarn' change the frequencies with the "
            f"sequence length or attention scale and are refused rather than ignored"
        )
    need = ["factor"] + (["low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"] if kind == "llama3" else [])
    for key in need:
        if scaling.get(key) is None:
            raise ConfigError(f"rope_scaling of type {kind} is missing {key!r}")
    if kind == "linear":
        return RopeScaling(factor=_float_value(scaling, "factor", 1.0, where), rope_type="linear")
    return RopeScaling(
        factor=_float_value(scaling, "factor", 1.0, where),
        low_freq_factor=_float_value(scaling, "low_freq_factor", 1.0, where),
        high_freq_factor=_float_value(scaling, "high_freq_factor", 4.0, where),
        original_max_position_embeddings=_int_value(
            scaling, "original_max_position_embeddings", where=where),
        rope_type="llama3",
    )
