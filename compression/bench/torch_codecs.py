#!/usr/bin/env python3
"""PyTorch-op yardstick for the CUDA codecs (compression/cuda/): the same five gradient codecs
written with PyTorch tensor ops the way GRACE (github.com/sands-lab/grace) writes them, each with
error feedback, timed with torch.cuda.Event on the GPU.

    python3 compression/bench/torch_codecs.py [--n 25600000] [--iters 50] [--json out.json]

Codecs (the math of compression/*.h; the payload is what these ops produce, which is what a
PyTorch implementation would send):
  onebit     sign bits packed 8 per byte + per-bucket (2048) means of each sign class
  threshold  |v| > tau (0.001): int32 indices of nonzero() + int8 signs, +-tau
  qsgd       16 levels, buckets of 512: norm, floor + bernoulli, int8 signed levels + norms
  terngrad   clip at 2.5 sigma, max, bernoulli, int8 ternary values + one scale
  fp16       half()

Bytes counted per call are those codec_bench counts for BM_CudaEncodeEF / BM_CudaDecodeAdd:
encode-EF 4n grad + 4n residual read + 4n residual write + payload; decode-add 8n (read and
write the accumulator) + payload. The yardstick is a torch device-to-device copy of n floats
(dst.copy_(src), 8n bytes); every figure is printed with its ratio to it (x copy). Compare the
GB/s with codec_bench's BM_CudaEncodeEF/<codec>/<n> and BM_CudaDecodeAdd/<codec>/<n>.
Input: N(0, 1e-3^2), the gradient codec_bench uses.
"""

import argparse
import json
import statistics
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=25600000, help="float32 elements (default 25.6M)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per case (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--codecs", default="onebit,threshold,qsgd,terngrad,fp16",
                   help="comma-separated subset")
    return p.parse_args()


def main():
    args = parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("torch_codecs.py: PyTorch is not installed")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch_codecs.py: no CUDA device visible to PyTorch")
    if args.n <= 0 or args.iters <= 0:
        sys.exit("torch_codecs.py: --n and --iters must be positive")
    dev = torch.device(args.device)
    n = args.n

    # ---- helpers ------------------------------------------------------------------------------
    bit_weights = (2 ** torch.arange(8, device=dev, dtype=torch.int32)).to(torch.uint8)

    def pack_bits(mask):
        m = mask.to(torch.uint8)
        pad = (-m.numel()) % 8
        if pad:
            m = torch.cat([m, m.new_zeros(pad)])
        return (m.view(-1, 8) * bit_weights).sum(dim=1, dtype=torch.uint8)

    def unpack_bits(packed, count):
        bits = (packed.unsqueeze(1) & bit_weights).ne(0).view(-1)
        return bits[:count]

    def buckets(v, size):
        """v viewed as (rows, size), zero-padded; and a validity mask (None when no padding)."""
        pad = (-v.numel()) % size
        if pad == 0:
            return v.view(-1, size), None
        valid = torch.ones(v.numel() + pad, device=v.device, dtype=torch.bool)
        valid[v.numel():] = False
        return torch.cat([v, v.new_zeros(pad)]).view(-1, size), valid.view(-1, size)

    # ---- codecs: encode(g, r) -> payload (tuple of tensors), residual updated in place;
    #      decode_add(payload, out) adds the decoded values into out --------------------------

    def onebit_encode(g, r, bucket=2048):
        v = g + r
        vb, valid = buckets(v, bucket)
        pos = vb >= 0
        if valid is not None:
            pos_cls, neg_cls = pos & valid, (~pos) & valid
        else:
            pos_cls, neg_cls = pos, ~pos
        cnt_pos = pos_cls.sum(dim=1)
        cnt_neg = neg_cls.sum(dim=1)
        sum_pos = (vb * pos_cls).sum(dim=1)
        sum_neg = (vb * neg_cls).sum(dim=1)
        mean_pos = sum_pos / cnt_pos.clamp(min=1)
        mean_neg = sum_neg / cnt_neg.clamp(min=1)
        decoded = torch.where(pos, mean_pos[:, None], mean_neg[:, None]).view(-1)[: v.numel()]
        r.copy_(v - decoded)
        return (pack_bits(pos.view(-1)[: v.numel()]), torch.stack([mean_neg, mean_pos], 1))

    def onebit_decode_add(payload, out, bucket=2048):
        bits, means = payload
        pos = unpack_bits(bits, out.numel())
        col = torch.arange(out.numel(), device=out.device) // bucket
        out += torch.where(pos, means[col, 1], means[col, 0])

    def threshold_encode(g, r, tau=0.001):
        v = g + r
        idx = (v.abs() > tau).nonzero().squeeze(1)
        sent = v[idx]
        sign = sent < 0
        step = (1.0 - 2.0 * sign.float()) * tau  # +tau or -tau
        r.copy_(v)
        r.index_add_(0, idx, -step)
        return (idx.to(torch.int32), sign.to(torch.int8))

    def threshold_decode_add(payload, out, tau=0.001):
        idx, sign = payload
        out.index_add_(0, idx.long(), (1.0 - 2.0 * sign.float()) * tau)

    def qsgd_encode(g, r, levels=16, bucket=512):
        v = g + r
        vb, _ = buckets(v, bucket)
        norm = vb.norm(dim=1)
        scale = torch.where(norm > 0, levels / norm, torch.zeros_like(norm))
        level_float = vb.abs() * scale[:, None]
        previous = level_float.floor()
        is_next = torch.rand_like(level_float) < (level_float - previous)
        level = (previous + is_next).clamp(max=levels)
        signed = (level * vb.sign()).to(torch.int8)
        decoded = (signed.float() * (norm / levels)[:, None]).view(-1)[: v.numel()]
        r.copy_(v - decoded)
        return (signed.view(-1)[: v.numel()], norm)

    def qsgd_decode_add(payload, out, levels=16, bucket=512):
        signed, norm = payload
        unit = (norm / levels).repeat_interleave(bucket)[: out.numel()]
        out += signed.float() * unit

    def terngrad_encode(g, r, clip=2.5):
        v = g + r
        sigma = v.std(unbiased=False)
        c = clip * sigma
        vc = v.clamp(-c, c)
        scale = vc.abs().max()
        p = vc.abs() / scale.clamp(min=1e-30)  # no host sync; scale 0 means vc == 0
        b = torch.bernoulli(p)
        ternary = (b * v.sign()).to(torch.int8)
        r.copy_(v - ternary.float() * scale)
        return (ternary, scale)

    def terngrad_decode_add(payload, out):
        ternary, scale = payload
        out += ternary.float() * scale

    def fp16_encode(g, r):
        v = g + r
        h = v.half()
        r.copy_(v - h.float())
        return (h,)

    def fp16_decode_add(payload, out):
        out += payload[0].float()

    codecs = {
        "onebit": (onebit_encode, onebit_decode_add),
        "threshold": (threshold_encode, threshold_decode_add),
        "qsgd": (qsgd_encode, qsgd_decode_add),
        "terngrad": (terngrad_encode, terngrad_decode_add),
        "fp16": (fp16_encode, fp16_decode_add),
    }
    selected = [c for c in args.codecs.split(",") if c]
    for c in selected:
        if c not in codecs:
            sys.exit(f"torch_codecs.py: unknown codec '{c}'; choose from {', '.join(codecs)}")

    def payload_bytes(payload):
        return sum(t.numel() * t.element_size() for t in payload if torch.is_tensor(t))

    def time_ms(fn):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        times = []
        result = None
        for k in range(args.warmup + args.iters):
            start.record()
            result = fn()
            stop.record()
            stop.synchronize()
            if k >= args.warmup:
                times.append(start.elapsed_time(stop))
        return statistics.median(times), result

    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    grad = torch.randn(n, device=dev, generator=gen) * 1e-3
    copy_dst = torch.empty_like(grad)
    copy_ms, _ = time_ms(lambda: copy_dst.copy_(grad))
    copy_bw = 8.0 * n / (copy_ms * 1e-3)

    rows = []
    for name in selected:
        encode, decode_add = codecs[name]
        residual = torch.zeros_like(grad)
        enc_ms, payload = time_ms(lambda: encode(grad, residual))
        pbytes = payload_bytes(payload)
        enc_bw = (12.0 * n + pbytes) / (enc_ms * 1e-3)
        out = torch.zeros_like(grad)
        dec_ms, _ = time_ms(lambda: decode_add(payload, out))
        dec_bw = (8.0 * n + pbytes) / (dec_ms * 1e-3)
        rows.append({
            "codec": name, "n": n, "payload_bytes": pbytes,
            "bits_per_element": 8.0 * pbytes / n,
            "encode_ef_ms": enc_ms, "encode_ef_gbps": enc_bw / 1e9,
            "encode_ef_x_copy": enc_bw / copy_bw,
            "decode_add_ms": dec_ms, "decode_add_gbps": dec_bw / 1e9,
            "decode_add_x_copy": dec_bw / copy_bw,
        })

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    print(f"PyTorch-op codecs on {name}, n = {n} floats, median of {args.iters} calls")
    print(f"yardstick: device copy {copy_ms:.3f} ms = {copy_bw / 1e9:.1f} GB/s (8n bytes)")
    print("| codec | bits/elt | EncodeEF ms | GB/s | x copy | DecodeAdd ms | GB/s | x copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['bits_per_element']:.3f} | {r['encode_ef_ms']:.3f} | "
              f"{r['encode_ef_gbps']:.1f} | {r['encode_ef_x_copy']:.3f} | "
              f"{r['decode_add_ms']:.3f} | {r['decode_add_gbps']:.1f} | "
              f"{r['decode_add_x_copy']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "n": n, "iters": args.iters, "copy_ms": copy_ms,
                       "copy_gbps": copy_bw / 1e9, "torch": torch.__version__, "codecs": rows},
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
