"""CKA between your own ``nn.Module``s with a ``DataLoader`` (the pytorch-cka API).

    python examples/custom_modules.py   # nothing is downloaded (--offline is accepted too)

Trains two small MLPs from different seeds on the same toy task, compares them with
``hf_cka.CKA``, and draws the three plots of the seed library: ``custom_heatmap.png``,
``custom_trend.png`` and ``custom_comparison.png`` (written in the current directory).
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_cka import CKA, plot_cka_comparison, plot_cka_heatmap, plot_cka_trend

LAYERS = ["fc1", "fc2", "fc3", "head"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(torch.relu(self.fc3(x)))


def trained_mlp(seed: int, x: torch.Tensor, y: torch.Tensor) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="no effect: nothing is downloaded")
    parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=generator)
    y = (x[:, 0] * x[:, 1] > 0).long()  # a non-linear toy task
    model_a, model_b = trained_mlp(1, x, y), trained_mlp(2, x, y)
    loader = DataLoader(TensorDataset(x), batch_size=64)  # batches are tuples: x is element 0

    def report(batch_idx: int, total: int, current: torch.Tensor) -> None:
        print(f"batch {batch_idx}/{total}: mean CKA {current.mean():.3f}")

    cka = CKA(model_a, model_b, "MLP (seed 1)", "MLP (seed 2)", LAYERS, LAYERS, progress=False)
    with cka:
        cross = cka.compare(loader, callback=report)
    results = cka.export(cross)  # the seed's dict: names, layers and "cka_matrix"
    self_a = CKA(model_a, model_a, model1_layers=LAYERS, model2_layers=LAYERS, progress=False)
    self_b = CKA(model_b, model_b, model1_layers=LAYERS, model2_layers=LAYERS, progress=False)
    matrices = [self_a(loader), cross, self_b(loader)]  # cka(loader) enters and exits hooks

    fig, _ = plot_cka_heatmap(
        results["cka_matrix"], LAYERS, LAYERS, results["model1_name"], results["model2_name"],
        annot=True,
    )  # fmt: skip
    fig.savefig("custom_heatmap.png", dpi=150)
    fig, _ = plot_cka_trend(
        [torch.diag(cross), matrices[0][:, -1], matrices[2][:, -1]],
        labels=["seed 1 vs seed 2, same layer", "seed 1: layer vs head", "seed 2: layer vs head"],
        xlabel="Layer", ylabel="CKA", xticklabels=LAYERS,
    )  # fmt: skip
    fig.savefig("custom_trend.png", dpi=150)
    fig, _ = plot_cka_comparison(
        matrices, titles=["seed 1 vs seed 1", "seed 1 vs seed 2", "seed 2 vs seed 2"],
        layers=LAYERS,
    )  # fmt: skip
    fig.savefig("custom_comparison.png", dpi=150)


if __name__ == "__main__":
    main()
