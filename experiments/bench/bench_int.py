"""Integer execution path vs fake-quant vs FP32 on DeiT-S (random weights), measured in one process.

    .venv/bin/python experiments/bench/bench_int.py [--batches N] [--repeats R] [--no-rss]
    .venv/bin/python experiments/bench/bench_int.py --threads 1 --profile-only   # the profile table alone, ~2 min

Prints:

1. eval time per pass at batch 16 (``--batches`` batches) and batch 1 (``--singles`` images) for
   FP32 eager, fake-quant W8A8 / W4A8 and the integer path W8A8 / W4A8 (per-channel symmetric
   weights, per-tensor affine min-max activations), the same with ``quant.vit.attn_matmul``
   ("+attn": q, k, v and softmax quantized; the int path runs both attention matmuls on int8),
   the ``export.kernels=int`` artifacts of the "+attn" models loaded as the grader does
   (``torch.export.load(p).module()``), the shipped ``w4a8`` recipe (rotated, MSE ranges, GPTQ) on int
   kernels and as its artifact, torchao's pt2e W8A8 reference / inductor-lowered
   model (``--no-peers`` skips them), ONNX Runtime (CPU, its default graph optimizations) on the FP32
   model, on qsweep's QDQ export (``export.format=onnx``) of the W8A8 / W4A8 models and on ORT's own
   ``quantize_static`` of the FP32 model (``--no-onnx`` skips them), and the "int8 GEMM floor": the
   int W8A8 model's GEMMs alone, ``torch._int_mm`` on codes of the same shapes, which no integer path
   can beat; best of
   ``--repeats``; the models are timed round-robin inside each repeat, so a load spike from other
   processes hits all of them alike, and ratios are to FP32 from the same repeat; the 1-minute load
   average is printed with each table;
2. a ``torch.profiler`` breakdown (self CPU time by category) of one batch-16 forward of the
   integer W8A8 models, next to FP32's (``--profile-only``: this table alone, to measure one change);
3. peak RSS while evaluating, each in a fresh subprocess that holds only the model evaluated
   (the int model is converted, then the float and fake-quant models are freed and
   ``malloc_trim`` returns their pages), plus the bytes of parameters and buffers per model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import peak_rss, rss_mb

import qsweep
from qsweep.config import shipped_recipe
from qsweep.export import export_program, load_program
from qsweep.quant.intkernel import IntGemm, to_int_backend

MODEL = "deit3_small_patch16_224"


def recipe(w_bits: int, attn: bool = False) -> dict:
    return {"weight": {"bits": w_bits, "symmetric": True, "granularity": "per_channel"},
            "act": {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"},
            "vit": {"attn_matmul": attn}}


def deit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=100).eval()


def images(n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def round_robin(models: dict[str, torch.nn.Module], batches: list[torch.Tensor], repeats: int
                ) -> dict[str, list[float]]:
    """Seconds per pass over ``batches`` for each model and repeat, the models timed in turn."""
    for m in models.values():
        m(batches[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            for x in batches:
                m(x)
            times[name].append(time.perf_counter() - start)
    return times


def cpu_description() -> str:
    """The CPU's model name and its int8 matrix extensions (the GEMM floor depends on them most)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    int8 = [flag for flag in fields.get("flags", "").split() if "vnni" in flag or flag.startswith("amx")]
    return f"{fields.get('model name', 'unknown CPU')} ({', '.join(int8) or 'no VNNI / AMX'})"


class GemmFloor(torch.nn.Module):
    """The int8 GEMMs of ``int_model``'s Linears and patch embedding alone (``torch._int_mm`` on random
    codes of the shapes a forward gives them): a bound no integer path on this CPU can go below."""

    def __init__(self, int_model: torch.nn.Module, image: torch.Tensor):
        super().__init__()
        layers = [m for m in int_model.modules() if isinstance(m, IntGemm)]
        rows: dict[int, int] = {}

        def record(m: torch.nn.Module, args: tuple) -> None:
            rows[id(m)] = args[0].numel() // m.in_features

        hooks = [m.register_forward_pre_hook(record) for m in layers]
        with torch.no_grad():
            int_model(image[:1])
        for h in hooks:
            h.remove()
        self.shapes = [(rows[id(m)], m.weight_t) for m in layers]  # rows per image, [K, N] codes
        self.codes: dict[int, list[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        if b not in self.codes:
            self.codes[b] = [torch.randint(-128, 128, (r * b, w.shape[0]), dtype=torch.int8) for r, w in self.shapes]
        for a, (_, w) in zip(self.codes[b], self.shapes):
            torch._int_mm(a, w)


OTHER = "other (views, Python, dispatch)"
ATTN_INT_MM = "int8 attention GEMM (QK^T, PV)"
CATEGORIES = [
    ("int8 GEMM (_int_mm)", ("aten::_int_mm",)),
    (ATTN_INT_MM, ()),  # the _int_mm calls with an out= tensor: IntAttention's per-head matmuls
    ("float GEMM (addmm/mm/conv)", ("aten::addmm", "aten::mm", "aten::mkldnn_convolution", "aten::linear")),
    ("activation quantization", ("aten::quantize_per_tensor", "aten::quantize_per_channel", "aten::set_",
                                 "aten::round_", "aten::clamp_", "aten::clamp", "aten::_to_copy")),
    ("zp correction + dequant epilogue", ("aten::sub", "aten::sub_", "aten::addcmul", "aten::addr_", "aten::sum")),
    ("attention (SDPA / softmax / bmm)", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
                                          "aten::bmm")),
    ("LayerNorm", ("aten::native_layer_norm",)),
    ("GELU", ("aten::gelu",)),
    ("add / mul (residual, layer scale)", ("aten::add", "aten::add_", "aten::mul", "aten::mul_")),
    ("copy_ (int32->fp32 cast, patches, bias)", ("aten::copy_", "aten::cat", "aten::clone", "aten::stack")),
]


@torch.no_grad()
def breakdown(model: torch.nn.Module, x: torch.Tensor, passes: int) -> dict[str, float]:
    """Self CPU seconds per category for one forward: each category's least time over ``passes``
    profiled passes (on a shared machine a load spike inflates whatever op it lands on)."""
    from torch.profiler import ProfilerActivity, profile

    model(x)
    best: dict[str, float] = {}
    for _ in range(passes):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
        out: dict[str, float] = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            cat = next((c for c, names in CATEGORIES if ev.key in names), OTHER)
            if ev.key == "aten::_int_mm" and len(ev.input_shapes) == 3:
                cat = ATTN_INT_MM
            out[cat] += ev.self_cpu_time_total / 1e6
        for cat, t in out.items():
            best[cat] = min(best.get(cat, float("inf")), t)
    return best


def rss_child(phase: str, batches: int) -> None:
    """Subprocess body: peak RSS while evaluating one model that is the only one alive."""
    model = deit()
    calib = images(batches, 16)
    if phase != "fp32":
        w_bits = 8 if phase.endswith("W8A8") else 4
        qmodel = qsweep.quantize(model, recipe(w_bits), calib)
        del model
        if phase.startswith("int"):
            model, _ = to_int_backend(qmodel)
            del qmodel
        else:
            model = qmodel
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    x = images(batches, 16, seed=100)
    with torch.no_grad():
        model(x[0])
        before = rss_mb()
        mem: dict = {}
        with peak_rss(mem):
            for xb in x:
                model(xb)
    print(json.dumps({"phase": phase, "before": before, "peak": mem["peak"], "bytes": model_bytes(model)}))


def pt2e_peers(fp: torch.nn.Module, calib: list[torch.Tensor]) -> dict[str, torch.nn.Module]:
    """torchao's pt2e W8A8 (X86InductorQuantizer): its reference model, and lowered by inductor.

    Empty when torchao is not installed (``pip install -e '.[peers]'``). The lowered model
    compiles on its first call of each batch shape (tens of seconds); round_robin's warm-up
    pass absorbs that.
    """
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        print("torchao not installed: no pt2e peer (pip install -e '.[peers]')")
        return {}
    graph = torch.export.export(fp, (calib[0],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    reference = convert_pt2e(prepared)
    # Freezing lets inductor fold the quantized weights into its int8 kernels.
    torch._inductor.config.freezing = True
    return {"pt2e W8A8 ref": reference, "pt2e W8A8 x86": torch.compile(reference, dynamic=True)}


def onnx_peers(fp: torch.nn.Module, qmodels: dict[str, torch.nn.Module], calib: list[torch.Tensor],
               folder: Path) -> dict[str, torch.nn.Module]:
    """ONNX Runtime sessions (CPU, default optimizations, torch's thread count): the FP32 model, qsweep's QDQ
    export of each of ``qmodels``, and ORT's ``quantize_static`` W8A8 of the FP32 model as ORT documents it
    (``quant_pre_process`` first; QDQ, per-channel int8 weights, per-tensor uint8 activations, min-max ranges
    on the same calibration images).

    Empty when ONNX Runtime is not installed (``pip install -e '.[onnx]'``).
    """
    try:
        from onnxruntime import quantization as oq
    except ImportError:
        print("onnxruntime not installed: no ONNX Runtime rows (pip install -e '.[onnx]')")
        return {}
    from qsweep.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
    from qsweep.onnx_runtime import OrtModel

    folder.mkdir(parents=True, exist_ok=True)
    fp_path, pre_path, static_path = folder / "fp32.onnx", folder / "fp32_pre.onnx", folder / "ort_static_W8A8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(fp, (calib[0],), str(fp_path), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: x.numpy()} for x in calib])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    oq.quant_pre_process(str(fp_path), str(pre_path))
    oq.quantize_static(str(pre_path), str(static_path), Reader(), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                       activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                       calibrate_method=oq.CalibrationMethod.MinMax)
    models = {"ORT FP32": OrtModel(fp_path)}
    for tag, qmodel in qmodels.items():
        models[f"ORT qsweep QDQ {tag}"] = OrtModel(export_onnx(qmodel, calib[0], folder / f"qsweep_{tag}.onnx"))
    models["ORT quantize_static W8A8"] = OrtModel(static_path)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2, help="batches of 16 images per timed pass")
    parser.add_argument("--singles", type=int, default=8, help="batch-1 images per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes timed per model; the best is reported")
    parser.add_argument("--profile-passes", type=int, default=5, help="profiled forwards per model")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--no-peers", action="store_true", help="skip torchao's pt2e models (slow to compile)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime sessions")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the profile table (FP32, int W8A8, int W8A8+attn): quick per-step measurements")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.batches)
        return

    fp = deit()
    calib = images(args.batches, 16)
    models = {"FP32 eager": fp}
    fallbacks, convert_s = {}, {}
    artifacts = Path(os.environ.get("TMPDIR", "/tmp")) / "qsweep_bench_int"
    for attn in (False, True):
        for w_bits in (8,) if args.profile_only else (8, 4):
            tag = f"W{w_bits}A8" + ("+attn" if attn else "")
            qmodel = qsweep.quantize(fp, recipe(w_bits, attn), calib)
            models[f"fake-quant {tag}"] = qmodel
            start = time.perf_counter()
            models[f"int {tag}"], fallbacks[tag] = to_int_backend(qmodel)
            convert_s[tag] = round(time.perf_counter() - start, 2)
            if attn and not args.profile_only:
                path = export_program(qmodel, calib[0], artifacts / f"{tag}.pt2", kernels="int")
                models[f"artifact {tag}"] = load_program(path)  # as the grader loads it
    if not args.profile_only:  # as `python -m qsweep` quantizes: rotated (residual folded, fc2 online), MSE, GPTQ
        shipped = qsweep.quantize(fp, shipped_recipe("w4a8"), calib)
        models["int shipped W4A8"], fallbacks["shipped W4A8"] = to_int_backend(shipped)
        path = export_program(shipped, calib[0], artifacts / "shipped_W4A8.pt2", kernels="int")
        models["artifact shipped W4A8"] = load_program(path)
    if not (args.no_peers or args.profile_only):
        models.update(pt2e_peers(fp, calib))
    if not (args.no_onnx or args.profile_only):
        models.update(onnx_peers(fp, {t: models[f"fake-quant {t}"] for t in ("W8A8", "W4A8")}, calib, artifacts))
    if not args.profile_only:
        models["int8 GEMM floor"] = GemmFloor(models["int W8A8"], calib[0])
    int_layer = next(m for m in models["int W8A8"].modules() if hasattr(m, "act_kernel"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {cpu_description()}; "
          f"fallbacks {fallbacks}; activation kernel: {int_layer.act_kernel}; to_int_backend seconds {convert_s}")

    timed = [] if args.profile_only else [(16, images(args.batches, 16, seed=100)),
                                          (1, images(args.singles, 1, seed=200))]
    for label, batches in timed:
        load_before = os.getloadavg()[0]
        times = round_robin(models, batches, args.repeats)
        n_img = len(batches) * label
        fp_times = times["FP32 eager"]
        print(f"\nbatch {label}: {len(batches)} x {label} images per pass, {args.repeats} repeats; "
              f"load average before / after {load_before:.2f} / {os.getloadavg()[0]:.2f}")
        print(f"{'model':<24} {'best ms/img':>11} {'best x FP32':>11} {'speedup':>8} {'median paired speedup':>22}")
        for name, ts in times.items():
            best_ratio = min(ts) / min(fp_times)
            paired = statistics.median(f / t for f, t in zip(fp_times, ts))
            print(f"{name:<24} {min(ts) / n_img * 1e3:>11.2f} {best_ratio:>11.3f} {1 / best_ratio:>8.2f} "
                  f"{paired:>22.2f}")

    x = images(1, 16, seed=300)[0]
    print(f"\nprofile of one batch-16 forward: self CPU ms per category, least of {args.profile_passes} profiled "
          f"passes (profiler overhead included); load average before {os.getloadavg()[0]:.2f}")
    names = ("FP32 eager", "int W8A8", "int W8A8+attn") if args.profile_only else (
        "FP32 eager", "fake-quant W8A8", "int W8A8", "int W8A8+attn")
    prof = {name: breakdown(models[name], x, args.profile_passes) for name in names}
    totals = {n: sum(prof[n].values()) for n in names}
    print(f"{'category':<36}" + "".join(f"{n:>18}" for n in names))
    for c in [c for c, _ in CATEGORIES] + [OTHER]:
        row = [prof[n].get(c, 0.0) for n in names]
        if any(row):
            cells = (f"{v * 1e3:>12.1f} {100 * v / totals[n]:>4.0f}%" for v, n in zip(row, names))
            print(f"{c:<36}" + "".join(cells))
    print(f"{'total':<36}" + "".join(f"{totals[n] * 1e3:>12.1f}      " for n in names))
    print(f"load average after {os.getloadavg()[0]:.2f}")

    if not (args.no_rss or args.profile_only):
        del models, fp, qmodel
        print("\npeak RSS while evaluating batch 16, fresh process per model (MB)")
        print(f"{'model':<20} {'RSS before':>11} {'peak RSS':>10} {'params+buffers MB':>18}")
        for phase in ("fp32", "fake W8A8", "int W8A8", "fake W4A8", "int W4A8"):
            cmd = [sys.executable, __file__, "--rss-child", phase, "--batches", str(args.batches)]
            out = subprocess.run(cmd + (["--threads", str(args.threads)] if args.threads else []),
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{phase:<20} {r['before']:>11.0f} {r['peak']:>10.0f} {r['bytes'] / 2**20:>18.1f}")


if __name__ == "__main__":
    main()
