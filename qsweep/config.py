"""Structured configs and their validation.

Hydra composes YAML from ``conf/``; :func:`validate` merges it onto these dataclasses (so an
unknown key or a wrongly typed value fails) and then checks every value range, before any
model or dataset is touched. Errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qsweep import score
from qsweep.errors import ConfigError
from qsweep.names import CONF_DIR, validate_output_names

# The names qsweep.quant.observers implements (OBSERVERS there; tests/test_architecture.py checks they agree).
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "kl", "sigma", "iqr", "auto")
# auto scores activation ranges through the weight they feed: there is no such consumer for weights.
WEIGHT_OBSERVERS = tuple(o for o in OBSERVERS if o != "auto")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACT_GRANULARITIES = ("per_tensor", "per_token")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_BITS = (2, 8)
ACT_BITS = (4, 16)
LAYER_OVERRIDE_KEYS = ("w_bits", "a_bits", "w_granularity", "group_size")
SCORES = tuple(score.SCORES)
WEIGHT_SOURCES = ("auto", "random", "pretrained")
MODEL_SOURCES = ("timm", "hf")
DEVICES = ("cpu", "cuda", "auto")
TEST_SETS = ("mini", "full")
MODES = ("run", "analyze", "search")
BACKENDS = ("auto", "fake", "int", "onnxruntime")
EXPORT_KERNELS = ("fake", "int")
EXPORT_FORMATS = ("torch", "onnx")  # export.format: the torch.export .pt2 | a QDQ ONNX model (qsweep.onnx_export)
WARM_COSTS = ("fisher", "sqnr")  # search.warm_cost: the per-layer cost of the knapsack warm start
FISHER_MODELS = ("categorical", "gaussian")  # quant.mixed.fisher: the output model of the Fisher information
ADAROUND_MODES = ("off", "layer", "block")
LSQ_MODES = ("off", "act", "weight", "both")
SOFTMAX_QUANTIZERS = ("uniform", "log2")
POST_LN_MODES = ("off", "reparam", "smooth")
INTOPS = ("off", "ivit")
SAMPLERS = ("tpe", "random", "nsga2", "local")  # local: neighbours of the best layouts (qsweep.search.local_sampler)
# score: the configured score; pareto: search.quality up and size down; agreement / kl / cosine: fidelity to FP32
OBJECTIVES = ("score", "pareto", "agreement", "kl", "cosine")
QUALITIES = ("top1", "agreement", "kl", "cosine")  # qsweep.search.fidelity.QUALITIES: a layout's quality measures
SEARCH_GROUPS = ("layer", "block", "type", "role")
PRUNERS = ("bound", "median", "none")


@dataclass
class TensorQuantConfig:
    """How one tensor kind (weights or input activations) is put on an integer grid."""

    bits: Optional[int] = 8  # None: leave in float (activations only)
    symmetric: bool = True
    granularity: str = "per_tensor"
    group_size: int = 128  # per_group only: input features per scale
    observer: str = "minmax"
    momentum: float = 0.95  # moving_average
    p: float = 99.99  # percentile: keep [100 - p, p]
    n: float = 3.0  # sigma: mean +- n * std
    k: float = 1.5  # iqr: [q1 - k * iqr, q3 + k * iqr]
    scale_dtype: str = "float32"  # storage of scales in the exported artifact


@dataclass
class CalibConfig:
    num_images: int = 256
    batch_size: int = 64
    class_balanced: bool = True
    seed: int = 0


@dataclass
class ViTQuantConfig:
    """ViT-aware options for timm attention blocks; each off by default."""

    attn_matmul: bool = False  # quantize q, k, v and the softmax output, not only Linear inputs
    attn_bits: int = 8  # q, k, v
    softmax_bits: int = 8  # the attention probabilities
    softmax_quantizer: str = "uniform"  # uniform | log2 (power-of-two levels: 2^-k * scale)
    post_ln: str = "off"  # off | reparam (RepQ-ViT: per-channel LN output scales folded to per-tensor)
    #                       | smooth (SmoothQuant: activation outliers migrated into the next weights)
    smooth_alpha: float = 0.5  # smooth: migration strength in [0, 1]


@dataclass
class GPTQConfig:
    """GPTQ weight rounding (Frantar et al. 2022) on the recipe's own grids, from calibration Hessians."""

    enabled: bool = False
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean, in (0, 1]
    act_order: bool = True  # round columns in order of decreasing Hessian diagonal
    block_size: int = 128  # columns rounded per lazy batch update
    num_samples: int = 128  # calibration samples the Hessians are collected on
    sequential: bool = True  # layer by layer in execution order, inputs after the earlier layers are rounded;
    #                          false: every Hessian from one pass of the nearest-rounded model
    # Layers with more weight bits keep nearest rounding: on Lite0's 84 calibration views GPTQ at 6 and 8 bits
    # fits the views, not the model (experiments/realvision). null: every layer.
    max_bits: Optional[int] = None


@dataclass
class BiasCorrectionConfig:
    """Quantized layers' biases absorb the mean output shift of quantization (qsweep.quant.bias_correct)."""

    enabled: bool = False
    layers: list[str] = field(default_factory=lambda: ["*"])  # the layers corrected: globs or kinds (@conv)
    # Of those, the ones whose output means are matched to the float model's (e.g. @depthwise);
    # the others absorb the mean shift of their own weight rounding.
    match_float: list[str] = field(default_factory=list)
    num_samples: int = 128  # calibration samples, run as one batch


@dataclass
class SmoothConfig:
    """Per-channel input scaling of quantized Linears (SmoothQuant / AWQ), searched per layer."""

    enabled: bool = False
    alpha: Optional[float] = None  # migration strength in [0, 1]; null: searched per layer by output error
    grid: int = 10  # alpha search: alpha = i / grid, i = 0..grid (and no scaling at all)
    max_tokens: int = 1024  # calibration tokens (rows) kept per layer to score the candidates


@dataclass
class RotateConfig:
    """Online Hadamard rotation of quantized Linears' inputs (QuaRot-style), after quant.smooth's scaling."""

    enabled: bool = False
    # A power of two: Hadamard blocks of this size, or of the largest power of two dividing a layer's
    # in_features if smaller. On MiniLM 64 matches 128's quality (W4A8 cosine 0.9888 both) at half
    # the rotation's FLOPs: DeiT-S int W4A8 0.46x FP32 time at batch 16 against 0.57x.
    block_size: int = 64
    # A timm ViT's residual stream and values rotated offline, folded into the weights (only fc2's input
    # stays online: qsweep.quant.rotate_residual); other models, or false, rotate every input online.
    residual: bool = False
    # false: where residual folded the stream, nothing rotated at run time (fc2's input stays unrotated; on
    # DeiT-S int W4A8 its rotation adds 18-22 % to the folded model's time: experiments/bench/INT.md); a
    # model that cannot be folded keeps every rotation online.
    online: bool = True


@dataclass
class MixedConfig:
    """One weight width per layer under an artifact-size budget (qsweep.quant.mixed), chosen before quantizing."""

    enabled: bool = False
    widths: list[Optional[int]] = field(default_factory=lambda: [3, 4, 5, 6, 8])  # a layer's choices; null: float
    budget_fraction: float = 0.6  # of the artifact with every chosen layer at the widest integer width
    budget_mb: Optional[float] = None  # the artifact's size in MB (1e6 bytes); overrides budget_fraction
    layers: list[str] = field(default_factory=lambda: ["*"])  # globs / kinds whose width is chosen; others keep theirs
    num_samples: int = 128  # calibration samples the Fisher information is measured on (one backward pass per draw)
    draws: int = 2  # outputs drawn per sample from the output model
    # the output model: categorical (class logits, labels drawn from their softmax) | gaussian (features such as
    # an embedding or last_hidden_state, y = output + unit Gaussian noise: the cost predicts their squared error)
    fisher: str = "categorical"
    kernels: str = "int"  # the artifact form whose bytes the budget counts: the run's export.kernels


@dataclass
class EmbeddingQuantConfig:
    """Weight-only quantization of ``nn.Embedding`` tables (token, position, ...), one symmetric scale per row.

    Their input is token ids, so there is no activation to quantize and nothing for GPTQ to fit.
    """

    bits: Optional[int] = None  # null: every embedding stays float
    observer: str = "mse"  # of each row's range (any weight observer)
    scale_dtype: str = "float16"  # one scale per row: 30k rows of a BERT vocabulary are 60 KB in float16
    skip: list[str] = field(default_factory=list)  # globs of embedding names left in float


@dataclass
class QuantConfig:
    name: str = "w4a8"
    weight: TensorQuantConfig = field(
        default_factory=lambda: TensorQuantConfig(bits=4, symmetric=True, granularity="per_channel")
    )
    act: TensorQuantConfig = field(
        default_factory=lambda: TensorQuantConfig(bits=8, symmetric=False, granularity="per_tensor")
    )
    skip: list[str] = field(default_factory=list)  # globs of module names left in float
    layers: dict[str, Any] = field(default_factory=dict)  # {glob: {w_bits, a_bits, ...}}
    fold_bn: bool = True
    calib: CalibConfig = field(default_factory=CalibConfig)
    vit: ViTQuantConfig = field(default_factory=ViTQuantConfig)
    smooth: SmoothConfig = field(default_factory=SmoothConfig)
    rotate: RotateConfig = field(default_factory=RotateConfig)
    intops: str = "off"  # off | ivit: integer-only Softmax, GELU and LayerNorm (I-ViT)
    residual_bits: Optional[int] = 16  # intops=ivit: residual stream width (timm Blocks); null: float
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    bias_correction: BiasCorrectionConfig = field(default_factory=BiasCorrectionConfig)
    mixed: MixedConfig = field(default_factory=MixedConfig)
    embeddings: EmbeddingQuantConfig = field(default_factory=EmbeddingQuantConfig)


@dataclass
class AdaRoundConfig:
    """Learned rounding of the quantized weights (Nagel et al. 2020)."""

    mode: str = "off"  # off | layer (each layer's output) | block (each transformer / residual block's output)
    # 300 steps of 512 rows: ~3.5 min for DeiT-S's 50 layers on 2 cores. On MiniLM W4A8, 1000 steps
    # bought +0.007 cosine over 200 at 5x the time (experiments/realweights/README.md).
    iters: int = 300
    lr: float = 1e-2
    reg_weight: float = 0.01  # rounding regularizer weight (lambda)
    beta_start: float = 20.0  # regularizer temperature annealed from beta_start to beta_end
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations with reconstruction loss only
    num_samples: int = 256  # calibration images used for reconstruction
    batch_size: int = 32
    act_quant: bool = False  # reconstruct with the layer inputs quantized
    # tokens / pixels sampled per step (convs and blocks: whole images covering them); null: batch_size images
    rows_per_iter: Optional[int] = 512
    seed: int = 0


@dataclass
class LSQConfig:
    """Learned step sizes (Esser et al. 2020) fitted to the float output on calibration data."""

    mode: str = "off"  # off | act | weight | both
    iters: int = 200
    lr: float = 1e-3
    num_samples: int = 256
    batch_size: int = 32
    seed: int = 0


@dataclass
class SearchConfig:
    """Optuna mixed-precision search (``mode=search``)."""

    study_name: Optional[str] = None  # null: the run's `name`
    storage: Optional[str] = None  # null: sqlite:///<project>/optuna.db | journal:PATH | postgresql://...
    n_trials: int = 40  # finished trials the study should hold, over all workers
    timeout_s: Optional[float] = None  # this worker stops starting trials after this many seconds
    # tpe | random | nsga2 | local: each trial a neighbour of a front member (of the best trials, one objective), by
    # exchanges of one width up and another down that the warm start's cost calls nearly neutral, within the budget
    sampler: str = "tpe"
    seed: Optional[int] = 0  # sampler seed; null: nondeterministic (use for several workers)
    # score (the configured score) | pareto (search.quality up, size down) | fidelity to the FP32 model's outputs on
    # the trial images, no labels needed: agreement (top-1 agreement, %, up) | kl (mean KL(FP32 || quantized), down)
    # | cosine (mean cosine of the output vectors, up)
    objective: str = "score"
    quality: str = "top1"  # objective=pareto: its quality axis, top1 | agreement | kl | cosine
    # A hard size budget in the artifact's exact bytes (the grader's torch.save of the loaded program): a layout
    # over it is not evaluated (pruned, its reason in the trial's `over_budget` attr; the sampler learns the
    # feasible region). null: none. Both set: the smaller one.
    max_size_mb: Optional[float] = None
    max_size_fraction: Optional[float] = None  # of the FP32 model's size (fp32_size_mb: torch.save of its state dict)
    w_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    a_bits: Optional[list[int]] = None  # null: the recipe's activation bits for every layer
    allow_float: bool = False  # keeping a layer in float is one of the choices
    # layer | block (one choice per transformer block / stage) | type (per layer kind) | role: the first layer, the
    # last one (classifier) and each depthwise conv alone (quant.layers' @first / @last / @depthwise), others per block
    group_by: str = "layer"
    layers: list[str] = field(default_factory=lambda: ["*"])  # globs of the layers searched; others keep the recipe
    warm_start: Optional[list[int]] = None  # uniform layouts enqueued first; null: one per width in w_bits
    # also enqueue sensitivity-guided layouts: per budget, the least summed per-layer sensitivity that fits it
    # (an exact multiple-choice knapsack over the artifact's bytes, checked by the exact size)
    greedy: bool = True
    # their per-layer cost: fisher (quant.mixed's Fisher-weighted rounding error at each width, with the
    # recipe's quant.mixed.fisher / num_samples / draws) | sqnr (each layer's output SQNR alone at
    # analysis.w_bits, extrapolated 4x noise per bit). On Lite0 fisher's layouts keep more agreement.
    warm_cost: str = "fisher"
    greedy_budget_mb: Optional[float] = None  # their size budget; null: each uniform layout's size between
    #                                           the narrowest and the widest width; capped by the size budget
    pruner: str = "bound"  # bound: stop a trial that can no longer beat the best | median | none
    prune_steps: int = 4  # partial evaluations reported per trial
    trial_images: Optional[int] = None  # test images per trial (a seeded subset); null: all
    top_k: int = 3  # best layouts re-evaluated on the whole test set at the end
    heartbeat_s: int = 10  # RDB storage: a trial silent for 2x this is failed and retried (journal: qsweep.search.retries)
    retries: int = 2  # times a trial whose worker died is retried
    best_dir: Optional[str] = None  # config dir for the best layout (experiment/best/<study>_best.yaml, run with
    #                                 --config-dir); null: <run folder>/conf. Never the installed package


@dataclass
class ModelConfig:
    name: str = "digits_vit"  # "digits_vit" (embedded) or any timm model name
    weights: str = "auto"  # auto: checkpoint, else embedded training; random; pretrained
    checkpoint: Optional[str] = None
    trust_checkpoint: bool = False  # allow unpickling a whole module (runs code!)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    source: str = "timm"  # timm (incl. digits_vit) | hf: a local Hugging Face image classifier in `path`
    path: Optional[str] = None  # source=hf: directory holding config.json and the weights
    # source=hf, false: load weights that lack some of the model's tensors or hold others (named in a warning
    # and in the weights tag); true: that is an error. A tensor of the wrong shape is an error either way.
    strict: bool = True


@dataclass
class DataConfig:
    """What every dataset reads; each dataset's own keys are in its subclass (:data:`DATA_SCHEMAS`)."""

    name: str = "digits"
    eval_batch_size: int = 256  # images per forward pass when evaluating (accuracy does not depend on it)
    max_eval_images: Optional[int] = None  # evaluate on the first N test images only; null: all


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled to 16x16."""

    seed: int = 0  # the stratified train/test split
    test_fraction: float = 0.25  # 450 test images


@dataclass
class Cifar100DataConfig(DataConfig):
    """CIFAR-100 (100 classes, 32x32), evaluated exactly as the lab's grader does."""

    name: str = "cifar100"
    eval_batch_size: int = 64  # the grader uses 1; accuracy is the same
    root: Optional[str] = None  # directory holding cifar-100-python/{train,test,meta} (torchvision's layout)
    download: bool = False  # fetch it with torchvision when missing (needs internet)
    test_set: str = "mini"  # mini: the lab's 500 (first per_class of each class, grouped by class) | full: 10,000
    per_class: int = 5  # mini only: test images kept per class (lab: 5)
    image_size: int = 224  # bicubic resize (crop ratio 1.0) + center crop to this (lab: 224)


@dataclass
class ImageFolderDataConfig(DataConfig):
    """Any class-per-folder image set (e.g. Imagenette): <root>/train/<class>/* and <root>/val/<class>/* (or test/)."""

    name: str = "imagefolder"
    eval_batch_size: int = 64
    root: Optional[str] = None  # the folder holding train/ and val/ (or test/)
    image_size: int = 224  # bilinear resize of the shorter side to floor(image_size / 0.875), then center crop
    convert_rgb: bool = False  # convert grayscale/RGBA/CMYK/palette files to RGB instead of failing, naming the file


# data.name -> its schema; conf/data/<name>.yaml selects it (schema/data/<name>), builders read its fields.
DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "digits": DigitsDataConfig, "cifar100": Cifar100DataConfig, "imagefolder": ImageFolderDataConfig,
}


@dataclass
class ScoreConfig:
    name: str = "relative"
    # The lab's reference point (DeiT-S on CIFAR-100); `relative` rescales to the model's FP32.
    ref_size_mb: float = 86.9
    ref_acc: float = 90.99


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "qsweep"
    run_name: Optional[str] = None
    log_model: bool = True


@dataclass
class ExportConfig:
    enabled: bool = True
    filename: str = "quantized.pt2"
    pte: bool = False  # also write an ExecuTorch .pte (optional extra: pip install -e '.[executorch]')
    pte_max_batch: int = 16  # ExecuTorch plans memory ahead: the largest batch the .pte accepts
    # int: the artifact runs torch._int_mm like eval.backend=int (same size, ~3x faster on CPU);
    # fake: dequantize + float ops, portable to any backend (the .pte is always this form)
    kernels: str = "int"
    # torch: the torch.export program (.pt2) | onnx: a QDQ ONNX model (<filename stem>.onnx) evaluated by ONNX
    # Runtime, its size still the .pt2 artifact's exact bytes (pip install -e '.[onnx]')
    format: str = "torch"


@dataclass
class EvalConfig:
    # auto: the artifact's own computation when exporting (export.kernels; onnxruntime for export.format=onnx),
    # else int | fake: float simulation | int: int8 GEMMs (torch._int_mm), same predictions
    # | onnxruntime: the exported ONNX file in an ONNX Runtime session (CPU), checked against int
    backend: str = "auto"


@dataclass
class AnalysisConfig:
    enabled: bool = False  # also analyze after a quantization run (mode=analyze: only analyze)
    w_bits: int = 4  # sensitivity: each layer alone quantized at these widths
    a_bits: Optional[int] = 8
    histogram_layers: Optional[list[str]] = None  # None: the layers with the largest outliers
    max_samples: int = 200_000  # activation values kept per layer for the plots


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    lsq: LSQConfig = field(default_factory=LSQConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mode: str = "run"  # run: quantize, evaluate, export, score, record | analyze: plots + sensitivity | search
    name: str = "default"  # the run's name: MLflow tag `experiment`, output folder; `name=...` on the command line
    seed: int = 0
    device: str = "cpu"
    cache_dir: Optional[str] = None  # None: $QSWEEP_CACHE or ~/.cache/qsweep
    progress: bool = True


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}{hint}")


def _in_range(key: str, value: Any, lo: float, hi: float, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        bounds = f"must be in [{lo}, {hi}]"  # stated always: `what` may speak of the lower bound only
        raise ConfigError(f"{key}={value!r} is not allowed; {f'{what} ({bounds})' if what else bounds}")


def _bits(key: str, value: Any, bounds: tuple[int, int], allow_float: bool) -> None:
    if value is None and allow_float:
        return
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        extra = " or null (float)" if allow_float else ""
        raise ConfigError(f"{key}={value!r} is not allowed; bits must be an integer in {lo}..{hi}{extra}")


def validate_tensor(prefix: str, t: TensorQuantConfig | DictConfig, is_weight: bool) -> None:
    _bits(f"{prefix}.bits", t.bits, WEIGHT_BITS if is_weight else ACT_BITS, allow_float=not is_weight)
    _choice(f"{prefix}.granularity", t.granularity, WEIGHT_GRANULARITIES if is_weight else ACT_GRANULARITIES)
    if is_weight and t.observer == "auto":
        raise ConfigError(f"{prefix}.observer='auto' is not allowed; auto scores activation ranges by the output "
                          f"error of the layer they feed. For weights choose one of {list(WEIGHT_OBSERVERS)} "
                          "(mse: lowest weight error per row), or quant.gptq.enabled=true")
    _choice(f"{prefix}.observer", t.observer, OBSERVERS)
    _choice(f"{prefix}.scale_dtype", t.scale_dtype, SCALE_DTYPES)
    if t.granularity == "per_group":
        _in_range(f"{prefix}.group_size", t.group_size, 1, 1 << 20, "group_size must be a positive integer")
    _in_range(f"{prefix}.momentum", t.momentum, 0.0, 1.0, "momentum must be in [0, 1)")
    if t.momentum >= 1.0:
        raise ConfigError(f"{prefix}.momentum={t.momentum!r} is not allowed; momentum must be in [0, 1)")
    _in_range(f"{prefix}.p", t.p, 50.0, 100.0, "the percentile p must be in [50, 100]")
    _in_range(f"{prefix}.n", t.n, 1e-6, 1e3, "sigma n must be > 0")
    _in_range(f"{prefix}.k", t.k, 0.0, 1e3, "iqr k must be >= 0")
    if t.granularity == "per_token" and t.observer != "minmax":
        raise ConfigError(
            f"{prefix}.observer={t.observer!r} is not allowed with granularity=per_token: "
            "per-token ranges are computed on the fly from each token's min/max; use observer=minmax"
        )


LAYER_KINDS = ("@conv", "@depthwise", "@first", "@last")  # qsweep.quant.plan.KINDS: layers selected by what they are


def validate_layer_overrides(layers: Any) -> None:
    for pattern, override in (layers or {}).items():
        if str(pattern).startswith("@"):
            _choice("quant.layers key", pattern, LAYER_KINDS)
        if not isinstance(override, (dict, DictConfig)):
            raise ConfigError(
                f"quant.layers.{pattern}={override!r} is not allowed; give a mapping with keys {list(LAYER_OVERRIDE_KEYS)}"
            )
        for key, value in override.items():
            _choice(f"quant.layers.{pattern} key", key, LAYER_OVERRIDE_KEYS)
            full = f"quant.layers.{pattern}.{key}"
            if key == "w_bits":
                _bits(full, value, WEIGHT_BITS, allow_float=True)
            elif key == "a_bits":
                _bits(full, value, ACT_BITS, allow_float=True)
            elif key == "w_granularity":
                _choice(full, value, WEIGHT_GRANULARITIES)
            elif key == "group_size":
                _in_range(full, value, 1, 1 << 20, "group_size must be a positive integer")


def validate_quant(q: QuantConfig | DictConfig) -> None:
    validate_tensor("quant.weight", q.weight, is_weight=True)
    validate_tensor("quant.act", q.act, is_weight=False)
    validate_layer_overrides(q.layers)
    _in_range("quant.calib.num_images", q.calib.num_images, 1, 10**7, "need at least 1 calibration image")
    _in_range("quant.calib.batch_size", q.calib.batch_size, 1, 10**5, "batch_size must be >= 1")
    _bits("quant.vit.attn_bits", q.vit.attn_bits, ACT_BITS, allow_float=False)
    _bits("quant.vit.softmax_bits", q.vit.softmax_bits, ACT_BITS, allow_float=False)
    _choice("quant.vit.softmax_quantizer", q.vit.softmax_quantizer, SOFTMAX_QUANTIZERS)
    _choice("quant.vit.post_ln", q.vit.post_ln, POST_LN_MODES)
    _in_range("quant.vit.smooth_alpha", q.vit.smooth_alpha, 0.0, 1.0)
    _choice("quant.intops", q.intops, INTOPS)
    if q.smooth.alpha is not None:
        _in_range("quant.smooth.alpha", q.smooth.alpha, 0.0, 1.0, "must be in [0, 1], or null to search it per layer")
    _in_range("quant.smooth.grid", q.smooth.grid, 1, 1000, "must be >= 1 (alpha steps of 1 / grid)")
    _in_range("quant.smooth.max_tokens", q.smooth.max_tokens, 1, 10**7, "must be >= 1")
    _bits("quant.residual_bits", q.residual_bits, (8, 32), allow_float=True)
    validate_gptq(q.gptq)
    validate_rotate(q.rotate)
    validate_mixed(q.mixed)
    validate_embeddings(q.embeddings)
    _in_range("quant.bias_correction.num_samples", q.bias_correction.num_samples, 1, 10**6,
              "need at least 1 calibration sample")
    for key in ("layers", "match_float"):
        for pattern in q.bias_correction[key] or ():
            if str(pattern).startswith("@"):
                _choice(f"quant.bias_correction.{key} entry", pattern, LAYER_KINDS)


def validate_embeddings(e: EmbeddingQuantConfig | DictConfig) -> None:
    _bits("quant.embeddings.bits", e.bits, WEIGHT_BITS, allow_float=True)
    _choice("quant.embeddings.observer", e.observer, WEIGHT_OBSERVERS)
    _choice("quant.embeddings.scale_dtype", e.scale_dtype, SCALE_DTYPES)


def validate_mixed(m: MixedConfig | DictConfig) -> None:
    if not any(b is not None for b in m.widths or ()):
        raise ConfigError(f"quant.mixed.widths={list(m.widths or [])} has no integer width; give the weight widths a "
                          "layer may take, e.g. [3, 4, 5, 6, 8] (null: float)")
    for bits in m.widths:
        _bits("quant.mixed.widths entry", bits, WEIGHT_BITS, allow_float=True)
    _in_range("quant.mixed.budget_fraction", m.budget_fraction, 1e-6, 4.0,
              "a fraction of the artifact with every chosen layer at the widest integer width, in (0, 4] (above 1 "
              "only with null, float, among quant.mixed.widths)")
    if m.budget_mb is not None:
        _in_range("quant.mixed.budget_mb", m.budget_mb, 1e-6, 1e9, "the artifact's size in MB, > 0")
    if not m.layers:
        raise ConfigError("quant.mixed.layers=[] selects nothing; use ['*'] for every quantized layer")
    for pattern in m.layers:
        if str(pattern).startswith("@"):
            _choice("quant.mixed.layers entry", pattern, LAYER_KINDS)
    _in_range("quant.mixed.num_samples", m.num_samples, 1, 10**6, "need at least 1 calibration sample")
    _in_range("quant.mixed.draws", m.draws, 1, 1000, "need at least 1 output draw per sample")
    _choice("quant.mixed.fisher", m.fisher, FISHER_MODELS)
    _choice("quant.mixed.kernels", m.kernels, EXPORT_KERNELS)


def validate_rotate(r: RotateConfig | DictConfig) -> None:
    allowed = [2**i for i in range(1, 16)]
    if r.block_size not in allowed:
        raise ConfigError(f"quant.rotate.block_size={r.block_size!r} is not allowed; use a power of two in "
                          f"[2, {allowed[-1]}] (Hadamard blocks), e.g. 64 or 128")


def validate_gptq(g: GPTQConfig | DictConfig) -> None:
    _in_range("quant.gptq.damp", g.damp, 1e-12, 1.0, "damp must be in (0, 1]")
    _in_range("quant.gptq.block_size", g.block_size, 1, 10**6, "block_size must be >= 1")
    _in_range("quant.gptq.num_samples", g.num_samples, 1, 10**7, "need at least 1 calibration sample")
    _bits("quant.gptq.max_bits", g.max_bits, WEIGHT_BITS, allow_float=True)


def gptq_replaced_by(gptq: GPTQConfig | DictConfig, adaround: AdaRoundConfig | DictConfig,
                     lsq: LSQConfig | DictConfig) -> str | None:
    """Why the recipe's GPTQ does not round this run's weights (None: it does, or it is off).

    ``adaround=`` and ``lsq=weight|both`` are chosen for a run and re-round the weights from the float
    ones, so they take precedence over the recipe's rounding (``quant=w4a8 adaround=layer`` works).
    """
    if not gptq.enabled:
        return None
    if adaround.mode != "off":
        return f"adaround.mode={adaround.mode} rounds the weights instead"
    if lsq.mode in ("weight", "both"):
        return f"lsq.mode={lsq.mode} re-rounds the weights to nearest with learned step sizes instead"
    return None


def validate_onnx(cfg: DictConfig) -> None:
    """``export.format=onnx`` / ``eval.backend=onnxruntime``: the ONNX file is what is evaluated and reported, and
    the recipe has a QDQ form (what only a layer override can still break is refused at export, naming it)."""
    onnx = cfg.export.enabled and cfg.export.format == "onnx"
    if cfg.eval.backend == "onnxruntime" and not onnx:
        raise ConfigError("eval.backend='onnxruntime' evaluates the exported ONNX model: set export.format=onnx "
                          f"(now export.format={cfg.export.format!r}, export.enabled={cfg.export.enabled})")
    if cfg.eval.backend == "onnxruntime" and cfg.mode == "search":
        raise ConfigError("eval.backend='onnxruntime' is not allowed with mode=search: trials are evaluated in "
                          "process; set eval.backend=auto (a run of the best layout with export.format=onnx "
                          "is evaluated by ONNX Runtime)")
    if not onnx:
        return
    if cfg.eval.backend not in ("auto", "onnxruntime"):
        raise ConfigError(f"eval.backend={cfg.eval.backend!r} with export.format='onnx': the ONNX file is what is "
                          "evaluated and reported (by ONNX Runtime); set eval.backend=auto (or 'onnxruntime'), "
                          "or export.format=torch")
    q = cfg.quant
    refused = [
        (cfg.export.pte, "export.pte=true", "ExecuTorch's .pte is written from the torch.export program"),
        (q.intops != "off", f"quant.intops={q.intops!r}", "its integer-only ops have no QDQ form; use off"),
        (q.act.granularity == "per_token", "quant.act.granularity='per_token'",
         "QuantizeLinear takes static scales; use per_tensor"),
        (q.vit.attn_matmul and q.vit.softmax_quantizer == "log2", "quant.vit.softmax_quantizer='log2'",
         "a power-of-two grid is not affine; use uniform"),
    ]
    for refuse, setting, reason in refused:
        if refuse:
            raise ConfigError(f"{setting} is not allowed with export.format='onnx': {reason}")


def validate_adaround(a: AdaRoundConfig | DictConfig) -> None:
    _choice("adaround.mode", a.mode, ADAROUND_MODES)
    _in_range("adaround.iters", a.iters, 1, 10**7, "need at least 1 iteration")
    _in_range("adaround.lr", a.lr, 1e-12, 10.0, "the learning rate must be in (0, 10]")
    _in_range("adaround.reg_weight", a.reg_weight, 0.0, 1e6, "must be >= 0")
    _in_range("adaround.beta_start", a.beta_start, 1e-3, 1e4, "must be > 0")
    _in_range("adaround.beta_end", a.beta_end, 1e-3, a.beta_start, "must be in (0, adaround.beta_start]")
    _in_range("adaround.warmup", a.warmup, 0.0, 0.99, "the warm-up fraction must be in [0, 1)")
    _in_range("adaround.num_samples", a.num_samples, 1, 10**7, "need at least 1 calibration sample")
    _in_range("adaround.batch_size", a.batch_size, 1, 10**5, "batch_size must be >= 1")
    if a.rows_per_iter is not None:
        _in_range("adaround.rows_per_iter", a.rows_per_iter, 1, 10**9, "must be >= 1, or null for whole batches")


def validate_lsq(lsq: LSQConfig | DictConfig) -> None:
    _choice("lsq.mode", lsq.mode, LSQ_MODES)
    _in_range("lsq.iters", lsq.iters, 1, 10**7, "need at least 1 iteration")
    _in_range("lsq.lr", lsq.lr, 1e-12, 10.0, "the learning rate must be in (0, 10]")
    _in_range("lsq.num_samples", lsq.num_samples, 1, 10**7, "need at least 1 calibration sample")
    _in_range("lsq.batch_size", lsq.batch_size, 1, 10**5, "batch_size must be >= 1")


def validate_search(s: SearchConfig | DictConfig) -> None:
    _in_range("search.n_trials", s.n_trials, 1, 10**7, "need at least 1 trial")
    if s.timeout_s is not None:
        _in_range("search.timeout_s", s.timeout_s, 1e-3, 1e9, "must be > 0, or null for no limit")
    _choice("search.sampler", s.sampler, SAMPLERS)
    _choice("search.objective", s.objective, OBJECTIVES)
    _choice("search.quality", s.quality, QUALITIES)
    if s.quality != "top1" and s.objective != "pareto":
        raise ConfigError(f"search.quality={s.quality!r} is not allowed with search.objective={s.objective!r}: it is "
                          f"pareto's quality axis; set search.objective=pareto, or search.objective={s.quality} alone")
    if s.max_size_mb is not None:
        _in_range("search.max_size_mb", s.max_size_mb, 1e-6, 1e9, "must be > 0 MB, or null for no budget")
    if s.max_size_fraction is not None:
        _in_range("search.max_size_fraction", s.max_size_fraction, 1e-6, 1.0,
                  "a fraction of the FP32 model's size, or null for no budget")
    _choice("search.group_by", s.group_by, SEARCH_GROUPS)
    _choice("search.pruner", s.pruner, PRUNERS)
    if not s.w_bits:
        raise ConfigError(f"search.w_bits={list(s.w_bits)!r} is not allowed; give at least one weight bit width "
                          f"in {WEIGHT_BITS[0]}..{WEIGHT_BITS[1]}")
    for b in s.w_bits:
        _bits("search.w_bits", b, WEIGHT_BITS, allow_float=False)
    if s.a_bits is not None:
        if not s.a_bits:
            raise ConfigError("search.a_bits=[] is not allowed; give activation bit widths, or null for the recipe's")
        for b in s.a_bits:
            _bits("search.a_bits", b, ACT_BITS, allow_float=False)
    if not s.layers:
        raise ConfigError("search.layers=[] is not allowed; give module-name globs, e.g. ['*']")
    for b in s.warm_start or []:
        _bits("search.warm_start", b, WEIGHT_BITS, allow_float=False)
        if b not in s.w_bits:
            raise ConfigError(f"search.warm_start={list(s.warm_start)} is not allowed; {b} is not in "
                              f"search.w_bits={list(s.w_bits)}")
    _choice("search.warm_cost", s.warm_cost, WARM_COSTS)
    if s.greedy_budget_mb is not None:
        _in_range("search.greedy_budget_mb", s.greedy_budget_mb, 1e-9, 1e9, "must be > 0 MB, or null")
    _in_range("search.prune_steps", s.prune_steps, 1, 1000, "must be >= 1")
    if s.trial_images is not None:
        _in_range("search.trial_images", s.trial_images, 1, 10**9, "must be >= 1, or null for all")
    _in_range("search.top_k", s.top_k, 0, 1000, "must be >= 0")
    _in_range("search.heartbeat_s", s.heartbeat_s, 1, 3600, "must be >= 1 second")
    _in_range("search.retries", s.retries, 0, 100, "must be >= 0")


def _structured(schema: type, cfg: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid config at {where}{'.' if where else ''}{key}: {exc.msg if hasattr(exc, 'msg') else exc}") from None


def data_config(data: Any) -> DictConfig:
    """``data`` (a dict, DictConfig or dataclass) on the schema of the dataset it names; a key that
    dataset does not read is an error naming it."""
    # A plain copy: the schema of another dataset (or the base) does not merge onto this one's.
    plain = OmegaConf.to_container(data if isinstance(data, DictConfig) else OmegaConf.create(data), resolve=True)
    name = plain.get("name", DataConfig.name)
    _choice("data.name", name, tuple(DATA_SCHEMAS))
    return _structured(DATA_SCHEMAS[name], plain, "data")


# Range checks of dataset keys, where the dataset's schema has the key: key -> (low, high, message).
DATA_RANGES = {
    "eval_batch_size": (1, 10**5, "must be >= 1"),
    "test_fraction": (0.01, 0.9, ""),
    "per_class": (1, 10**6, "must be >= 1"),
    "image_size": (1, 10**5, "must be >= 1"),
}


def validate_data(d: DictConfig) -> None:
    for key, (lo, hi, what) in DATA_RANGES.items():
        if key in d:
            _in_range(f"data.{key}", d[key], lo, hi, what)
    if d.max_eval_images is not None:
        _in_range("data.max_eval_images", d.max_eval_images, 1, 10**9, "must be >= 1")
    if "test_set" in d:
        _choice("data.test_set", d.test_set, TEST_SETS)


def quant_recipe(recipe: Any) -> DictConfig:
    """A validated ``conf/quant``-shaped recipe from a dict, DictConfig or QuantConfig."""
    if isinstance(recipe, QuantConfig):
        recipe = OmegaConf.structured(recipe)
    cfg = _structured(QuantConfig, recipe if recipe is not None else {}, "quant")
    validate_quant(cfg)
    return cfg


def validate_model_source(model: Any) -> None:
    """``model.source`` / ``model.path``: an HF model needs a local directory with a config.json."""
    import os

    _choice("model.source", model.source, MODEL_SOURCES)
    if model.source != "hf":
        if not model.strict:
            raise ConfigError(f"model.strict=false is not allowed with model.source={model.source}: it applies to "
                              "Hugging Face folders (model.source=hf); a model.checkpoint must match the model exactly")
        return
    path = model.path
    if not path or not os.path.isfile(os.path.join(os.path.expanduser(str(path)), "config.json")):
        raise ConfigError(f"model.path={path!r} is not allowed with model.source=hf: give a local directory "
                          "holding a Hugging Face model's config.json and weights (save_pretrained output)")
    if model.checkpoint:
        raise ConfigError(f"model.checkpoint={model.checkpoint!r} is not allowed with model.source=hf: the "
                          "weights come from model.path; leave model.checkpoint=null")
    if model.name == "digits_vit":  # the default name: label the run by the model directory instead
        model.name = "hf:" + os.path.basename(os.path.normpath(os.path.expanduser(str(path))))


def validate(cfg: DictConfig) -> DictConfig:
    """The composed run config checked against :class:`RootConfig` (drops Hydra's own node)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    data = data_config(plain.pop("data", {}))
    out = _structured(RootConfig, plain, "")
    out.data = data
    validate_output_names(out)  # first: Hydra has already made a run folder of `name`
    validate_quant(out.quant)
    _choice("score.name", out.score.name, SCORES)
    _choice("model.weights", out.model.weights, WEIGHT_SOURCES)
    validate_model_source(out.model)
    _choice("device", out.device, DEVICES)
    _choice("mode", out.mode, MODES)
    _choice("eval.backend", out.eval.backend, BACKENDS)
    _choice("export.kernels", out.export.kernels, EXPORT_KERNELS)
    _choice("export.format", out.export.format, EXPORT_FORMATS)
    validate_onnx(out)
    if out.export.enabled and out.export.format == "torch" and out.eval.backend not in ("auto", out.export.kernels):
        # The reported accuracy must be the artifact's own computation (checked after export).
        raise ConfigError(f"eval.backend={out.eval.backend!r} with export.kernels={out.export.kernels!r}: the "
                          "artifact would not compute what is evaluated; set eval.backend=auto (or "
                          f"{out.export.kernels!r}), or export.kernels={out.eval.backend!r}")
    if out.quant.mixed.enabled and out.quant.mixed.kernels != out.export.kernels:
        raise ConfigError(f"quant.mixed.kernels={out.quant.mixed.kernels!r} with export.kernels="
                          f"{out.export.kernels!r}: the size budget would count another artifact than the one "
                          f"exported; set quant.mixed.kernels={out.export.kernels!r}")
    validate_adaround(out.adaround)
    validate_lsq(out.lsq)
    validate_search(out.search)
    _bits("analysis.w_bits", out.analysis.w_bits, WEIGHT_BITS, allow_float=False)
    _bits("analysis.a_bits", out.analysis.a_bits, ACT_BITS, allow_float=True)
    validate_data(out.data)
    return out


SCHEMA = "qsweep_schema"


def shipped_recipe(name: str) -> DictConfig:
    """``conf/quant/<name>.yaml`` as Hydra composes it (its defaults list included), for ``qsweep.quantize``."""
    options = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))
    if name not in options:
        raise ConfigError(f"quant={name!r} is not allowed; choose one of {options}")
    return compose_shipped([f"quant={name}"]).quant


def compose_shipped(overrides: list[str]) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides``, also from inside a running Hydra app (its search path)."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def register_schema() -> None:
    """Make the dataclasses Hydra's schema (``conf/config.yaml`` lists it first in its defaults).

    Every default lives in the dataclasses above; a ``conf/`` option file states only what differs,
    and composing an unknown key or a wrongly typed value fails.
    """
    store = ConfigStore.instance()
    store.store(name=SCHEMA, node=RootConfig)
    # Each conf/data option names its dataset's schema in its defaults list: /schema/data/<name>@_here_.
    for name, schema in DATA_SCHEMAS.items():
        store.store(group="schema/data", name=name, node=schema)


register_schema()
