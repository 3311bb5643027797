#!/usr/bin/env python3
"""PyTorch yardstick for kernel_bench's BM_TrainStep: images/s of one SGD training step
(forward, cross-entropy, backward, SGD with momentum and weight decay) at batch 128 on the CPU,
for the same mlp / cnn / resnet20 architectures qtrain builds (worker/nn/model.h), on the CPU or,
with --device cuda, on a GPU (cuDNN, eager; the yardstick of kernel_bench's BM_CudaTrainStep).
On the GPU each step does what qtrain's CUDA step does: copy the batch in from pinned host memory
and read the loss back (one host sync). TF32 is off unless --tf32 (qtrain's kernels are FP32).

Run it pinned to the same cores as qtrain's benchmark, e.g.
    taskset -c 0,1 python3 worker/bench/pytorch_train_step.py --threads 2
    python3 worker/bench/pytorch_train_step.py --device cuda
Prints one line per model: "pytorch <model> batch=128 threads=2 images_per_second=N".
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """He et al. CIFAR basic block with option-A shortcut (stride-2 subsample, zero-pad channels)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x
        if self.stride != 1 or self.pad:
            sc = x[:, :, :: self.stride, :: self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + sc)


def resnet20(cin, classes):
    layers = [nn.Conv2d(cin, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    c = 16
    for stage, cout in enumerate([16, 32, 64]):
        for i in range(3):
            layers.append(BasicBlock(c, cout, 2 if (stage > 0 and i == 0) else 1))
            c = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)


def cnn(cin, hw, classes):
    def block(a, b):
        return [nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]

    s = hw // 4
    return nn.Sequential(*block(cin, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                         *block(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * s * s, 256),
                         nn.ReLU(), nn.Linear(256, classes))


def mlp(cin, hw, classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(cin * hw * hw, 512), nn.ReLU(), nn.Linear(512, 256),
                         nn.ReLU(), nn.Linear(256, classes))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", default="mlp,cnn,resnet20")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN and matmul (GPU)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    for name in a.models.split(","):
        model = {"mlp": lambda: mlp(1, 28, 10), "cnn": lambda: cnn(1, 28, 10),
                 "resnet20": lambda: resnet20(1, 10)}[name]().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        x = torch.randn(a.batch, 1, 28, 28)
        y = torch.randint(0, 10, (a.batch,))
        if gpu:
            x, y = x.pin_memory(), y.pin_memory()
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            if gpu:
                loss = F.cross_entropy(model(x.to(dev, non_blocking=True)),
                                       y.to(dev, non_blocking=True))
                loss.backward()
                opt.step()
                loss.item()
            else:
                F.cross_entropy(model(x), y).backward()
                opt.step()

        for _ in range(5):
            step()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            step()
            n += 1
        dt = time.perf_counter() - t0
        where = f"device={torch.cuda.get_device_name(dev)} tf32={int(a.tf32)}" if gpu else \
            f"threads={a.threads}"
        print(f"pytorch {name} batch={a.batch} {where} "
              f"images_per_second={n * a.batch / dt:.1f} torch={torch.__version__}", flush=True)


if __name__ == "__main__":
    main()
