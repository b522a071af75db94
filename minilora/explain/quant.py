"""`minilora explain quant`: one block of a real weight through NF4, step by step, and a whole layer in three 4-bit
formats (QLoRA section 3; the recipe is minilora/quant/blockwise.py's docstring, the code tables codebooks.py).

For one block of `blocksize` values (flattened row-major, as the quantizer cuts them):

    absmax      = max |w|                                   (float32; one per block)
    normalised  = w / absmax                                in [-1, 1]
    index       = the nearest of the 16 NF4 levels           (a tie goes to the lower index)
    packed      = (index[0::2] << 4) | index[1::2]           two indices a byte, the first in the HIGH nibble
    double quant: absmax - mean(absmax over the tensor) -> an 8-bit code, with one float32 scale per 256 blocks
    dequantized = level[index] * absmax                      (and with the double-quantized absmax)

Every step is computed here in plain torch, apart from the quantizer; tests/explain/ compare the indices and bytes
with minilora.quant.quantize_4bit on the same weight. For a layer: the histogram of w / absmax against the NF4,
FP4 and int4 levels, each format's error, and the bytes per parameter with and without double quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minilora.kernels import reference_mode
from minilora.quant import dequantize_4bit, dequantize_absmax, get_code, quantize_4bit

INT4_LEVELS = torch.arange(-7, 8, dtype=torch.float32) / 7  # symmetric absmax int4: k / 7, k = -7..7 (15 used)
FORMATS = ("nf4", "fp4", "int4")


@dataclass
class BlockWalkthrough:
    """One block of a weight through NF4/FP4, every intermediate value kept."""

    key: str
    block: int
    blocksize: int
    quant_type: str
    start: int  # flat index of the block's first element
    values: torch.Tensor  # (blocksize,) float32, the weight's values
    absmax: float
    normalized: torch.Tensor  # values / absmax
    indices: torch.Tensor  # (blocksize,) int64, the 4-bit codes
    levels: torch.Tensor  # code[indices]
    packed: torch.Tensor  # (blocksize // 2,) uint8
    absmax_code: int  # double quant: the 8-bit code stored for this block's absmax
    nested_absmax: float  # double quant: the float32 scale of this block's group of 256
    offset: float  # double quant: mean absmax of the tensor
    absmax_dq: float  # the absmax decoded from the 8-bit code
    dequantized: torch.Tensor  # levels * absmax
    dequantized_dq: torch.Tensor  # levels * absmax_dq

    @property
    def error(self) -> torch.Tensor:
        return self.dequantized - self.values

    @property
    def error_dq(self) -> torch.Tensor:
        return self.dequantized_dq - self.values


def explain_block(
    weight: torch.Tensor, block: int = 0, quant_type: str = "nf4", blocksize: int = 64, key: str = "tensor"
) -> BlockWalkthrough:
    """Walk block `block` of `weight` through 4-bit quantization (a full block; see the module docstring)."""
    flat = weight.detach().reshape(-1).float()
    n_full = flat.numel() // blocksize
    if not 0 <= block < n_full:
        raise ValueError(f"{key}: block {block} is not one of the {n_full} full blocks of {blocksize} values")
    start = block * blocksize
    values = flat[start : start + blocksize]
    code = get_code(quant_type)
    absmax = values.abs().max()
    normalized = values * (1.0 / absmax) if absmax > 0 else torch.zeros_like(values)
    distance = (normalized[:, None] - code[None, :]).abs()  # (blocksize, 16)
    indices = distance.argmin(dim=1)  # argmin keeps the first of equal distances: the lower index of a tie
    packed = ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)
    # double quantization works on the absmax of every block of the tensor: take the quantizer's
    _, state = quantize_4bit(weight.detach().float(), blocksize, quant_type, compress_statistics=True)
    absmax_dq = float(dequantize_absmax(state)[block])
    levels = code[indices]
    return BlockWalkthrough(
        key=key,
        block=block,
        blocksize=blocksize,
        quant_type=quant_type,
        start=start,
        values=values,
        absmax=float(absmax),
        normalized=normalized,
        indices=indices,
        levels=levels,
        packed=packed,
        absmax_code=int(state.absmax[block]),
        nested_absmax=float(state.state2.absmax[block // state.state2.blocksize]),
        offset=float(state.offset),
        absmax_dq=absmax_dq,
        dequantized=levels * absmax,
        dequantized_dq=levels * absmax_dq,
    )


def block_text(w: BlockWalkthrough) -> str:
    """The walkthrough as a table, one row per value, and the stored bytes."""
    out = [
        f"# One block of {w.key} through {w.quant_type.upper()}",
        "",
        f"block {w.block}: elements {w.start}..{w.start + w.blocksize - 1} (flattened row-major), "
        f"blocksize {w.blocksize}",
        f"1. absmax = max |w| = {w.absmax:.8g}   (stored as float32, or with double quant as below)",
        "2. normalised = w / absmax, in [-1, 1]",
        f"3. index = the nearest of the 16 {w.quant_type.upper()} levels (ties to the lower index)",
        "",
        "|  i | w | w / absmax | index | level | level x absmax | error |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(w.blocksize):
        out.append(
            f"| {i} | {float(w.values[i]):+.6f} | {float(w.normalized[i]):+.4f} | {int(w.indices[i])} | "
            f"{float(w.levels[i]):+.4f} | {float(w.dequantized[i]):+.6f} | {float(w.error[i]):+.2e} |"
        )
    hexbytes = " ".join(f"{int(b):02x}" for b in w.packed)
    rms = float(w.error.pow(2).mean().sqrt())
    rms_dq = float(w.error_dq.pow(2).mean().sqrt())
    out += [
        "",
        f"4. packed (element 2i in the high nibble): {w.packed.numel()} bytes",
        f"   {hexbytes}",
        "5. double quantization of the absmax (QLoRA section 3):",
        f"   offset = mean absmax of the tensor = {w.offset:.8g}; this block's group of 256 has scale "
        f"{w.nested_absmax:.8g};",
        f"   code8 = {w.absmax_code} -> absmax = dynamic8[{w.absmax_code}] x {w.nested_absmax:.6g} + offset = "
        f"{w.absmax_dq:.8g} (exact: {w.absmax:.8g}, error {w.absmax_dq - w.absmax:+.2e})",
        f"6. dequantized = level x absmax: RMS error {rms:.3e}, max {float(w.error.abs().max()):.3e} "
        f"({rms / max(float(w.values.pow(2).mean().sqrt()), 1e-30):.2%} of the block's RMS); "
        f"with the double-quantized absmax: RMS {rms_dq:.3e}",
    ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- a whole layer
@dataclass
class FormatStats:
    """One format's round trip of a whole weight."""

    name: str
    levels: torch.Tensor  # the 16 (int4: 15) values in [-1, 1]
    error: torch.Tensor  # dequantized - weight, flat float32
    rel_error: float  # ||error||_F / ||w||_F
    rms_error: float
    max_error: float


@dataclass
class LayerQuant:
    """A weight in NF4, FP4 and int4 at one blocksize, and its stored bytes."""

    key: str
    shape: tuple[int, ...]
    blocksize: int
    normalized: torch.Tensor  # w / absmax of its block, flat
    formats: dict[str, FormatStats]
    bytes_nf4: int  # packed codes + float32 absmax
    bytes_nf4_dq: int  # packed codes + uint8 absmax + float32 nested absmax

    @property
    def numel(self) -> int:
        return int(self.normalized.numel())

    def bits_per_param(self, double_quant: bool) -> float:
        return 8 * (self.bytes_nf4_dq if double_quant else self.bytes_nf4) / self.numel


def _int4_round_trip(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Symmetric absmax int4 at `blocksize`: round(7 w / absmax) / 7 * absmax, a textbook linear 4-bit format."""
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    return ((blocks / absmax * 7).round().clamp(-7, 7) / 7 * absmax).reshape(-1)[: flat.numel()]


def _stats(name: str, levels: torch.Tensor, flat: torch.Tensor, dequantized: torch.Tensor) -> FormatStats:
    error = dequantized - flat
    return FormatStats(
        name=name,
        levels=levels,
        error=error,
        rel_error=float(error.norm() / flat.norm().clamp(min=1e-30)),
        rms_error=float(error.pow(2).mean().sqrt()),
        max_error=float(error.abs().max()),
    )


def explain_layer(weight: torch.Tensor, blocksize: int = 64, key: str = "tensor") -> LayerQuant:
    """NF4, FP4 (minilora's quantizer) and int4 round trips of `weight`, and its 4-bit bytes.

    Runs minilora's reference code (no compiled kernel: nothing to compile for one layer, and it is the code a
    reader follows)."""
    with reference_mode():
        return _explain_layer(weight.detach().float(), blocksize, key)


def _explain_layer(w: torch.Tensor, blocksize: int, key: str) -> LayerQuant:
    flat = w.reshape(-1)
    formats = {}
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, blocksize, quant_type, compress_statistics=False)
        formats[quant_type] = _stats(quant_type, get_code(quant_type), flat, dequantize_4bit(packed, state).reshape(-1))
    formats["int4"] = _stats("int4", INT4_LEVELS, flat, _int4_round_trip(flat, blocksize))
    packed, state = quantize_4bit(w, blocksize, "nf4", compress_statistics=False)
    _, dq = quantize_4bit(w, blocksize, "nf4", compress_statistics=True)
    absmax = state.absmax.repeat_interleave(blocksize)[: flat.numel()].clamp(min=1e-38)
    return LayerQuant(
        key=key,
        shape=tuple(w.shape),
        blocksize=blocksize,
        normalized=flat / absmax,
        formats=formats,
        bytes_nf4=packed.numel() + 4 * state.absmax.numel(),
        bytes_nf4_dq=packed.numel() + dq.absmax.numel() + 4 * dq.state2.absmax.numel(),
    )


def layer_text(layer: LayerQuant) -> str:
    b = layer.blocksize
    out = [
        f"# {layer.key} {list(layer.shape)} in three 4-bit formats (blocksize {b})",
        "",
        "| format | levels | relative error (Frobenius) | RMS error | max error |",
        "|---|---:|---:|---:|---:|",
    ]
    for f in layer.formats.values():
        out.append(f"| {f.name} | {f.levels.numel()} | {f.rel_error:.4f} | {f.rms_error:.3e} | {f.max_error:.3e} |")
    out += [
        "",
        f"bytes per parameter (NF4): {layer.bits_per_param(False) / 8:.4f} B = {layer.bits_per_param(False):.3f} bits "
        f"(4 + 32/{b}) without double quantization; {layer.bits_per_param(True) / 8:.4f} B = "
        f"{layer.bits_per_param(True):.3f} bits (4 + 8/{b} + 32/({b}*256)) with it "
        f"({layer.bytes_nf4:,} vs {layer.bytes_nf4_dq:,} B for {layer.numel:,} weights).",
        "NF4's levels are quantiles of N(0, 1): where w / absmax is dense (near 0) they are close together, "
        "which is why its error is the smallest on normal-looking weights.",
    ]
    return "\n".join(out) + "\n"


def plot_layer(layer: LayerQuant, directory: str) -> list[str]:
    """quant_histogram.png (w / absmax against each format's levels) and quant_error.png; returns the paths."""
    from minilora.explain.plots import new_figure, save

    fig, axes = new_figure(1, 3, (15, 4))
    for ax, name in zip(axes, FORMATS, strict=True):
        ax.hist(layer.normalized.numpy(), bins=200, range=(-1, 1), color="0.6")
        for level in layer.formats[name].levels.tolist():
            ax.axvline(level, color="tab:red", linewidth=0.8)
        ax.set_title(f"{layer.key}: w / absmax vs {name} levels")
        ax.set_xlabel(f"w / absmax (blocksize {layer.blocksize})")
    paths = [save(fig, directory, "quant_histogram.png")]
    fig, axes = new_figure(1, 1, (7, 4))
    ax = axes[0]
    scale = max(f.max_error for f in layer.formats.values())
    for f in layer.formats.values():
        ax.hist(
            f.error.numpy(), bins=200, range=(-scale, scale), histtype="step", label=f"{f.name} ({f.rel_error:.3f})"
        )
    ax.set_yscale("log")
    ax.set_xlabel("dequantized - w")
    ax.set_title(f"{layer.key}: round-trip error per format (relative error)")
    ax.legend()
    paths.append(save(fig, directory, "quant_error.png"))
    return paths
