"""The PyTorch knowledge-distillation tutorial's loop as written: the baseline of the speed
benchmark (kdresearch.pipelines.speed_benchmark).

Its code path: a shuffled DataLoader (num_workers=2) over a dataset that turns each image into a
PIL image and applies ToTensor + Normalize, NCHW fp32 models with the tutorial's (not in-place)
ReLUs and its layers in their literal order, and the teacher's forward under no_grad on every
student step. The benchmark runs it in a fresh interpreter of its own,

    python -m kdresearch.pipelines.tutorial_baseline '{"data_overrides": [...], "epochs": ..., ...}'

(`baseline_command`), so that no setting kdresearch makes in its process (e.g.
`device.keep_freed_memory`) reaches it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdresearch.config.groups import build
from kdresearch.data.splits import ImageData
from kdresearch.models import DeepNN, LightNN, ModelOutputs

# The tutorial's five jobs, in order.
KINDS = ("teacher", "ce", "kd", "cosine", "regressor")


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        import torchvision.transforms as transforms

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def tutorial_loaders(data: ImageData, batch_size: int):
    train = TutorialDataset(data.train_images, data.train_labels, data.mean, data.std)
    test = TutorialDataset(data.test_images, data.test_labels, data.mean, data.std)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2),
            torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=2))


def tutorial_train(model, teacher, train_loader, epochs, loss_kind, T=2.0, regressor=None):
    """The tutorial's train / train_knowledge_distillation / train_cosine_loss / train_mse_loss."""
    ce_loss = nn.CrossEntropyLoss()
    cosine_loss = nn.CosineEmbeddingLoss()
    mse_loss = nn.MSELoss()
    params = list(model.parameters()) + (list(regressor.parameters()) if regressor is not None else [])
    optimizer = torch.optim.Adam(params, lr=0.001)
    model.train()
    if teacher is not None:
        teacher.eval()
    for _ in range(epochs):
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            if loss_kind == "ce":
                loss = ce_loss(model(inputs), labels)
            else:
                with torch.no_grad():
                    t_out = teacher(inputs, with_features=True)
                s_out = model(inputs, with_features=True)
                label_loss = ce_loss(s_out.logits, labels)
                if loss_kind == "kd":
                    soft_targets = nn.functional.softmax(t_out.logits / T, dim=-1)
                    soft_prob = nn.functional.log_softmax(s_out.logits / T, dim=-1)
                    term = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (T**2)
                elif loss_kind == "cosine":
                    t_hidden = nn.functional.avg_pool1d(t_out.hidden, 2)
                    term = cosine_loss(s_out.hidden, t_hidden, target=torch.ones(inputs.size(0)))
                else:
                    term = mse_loss(regressor(s_out.feature_map), t_out.feature_map)
                loss = 0.25 * term + 0.75 * label_loss
            loss.backward()
            optimizer.step()


def tutorial_test(model, test_loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in test_loader:
            predicted = model(inputs).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total


def as_written(model: nn.Module) -> nn.Module:
    """The tutorial's network as it runs there: ReLUs that allocate their output (kdresearch's work
    in place) and its layers in their literal order (kdresearch pools before each block's last
    ReLU: the same values, less work), features -> flatten -> classifier."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False

    def literal_outputs(x):
        stages = []
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(x)
        hidden = torch.flatten(x, 1)
        embedding = model.classifier[:-1](hidden)
        return ModelOutputs(model.classifier[-1](embedding), embedding, tuple(stages), hidden)

    model.outputs = literal_outputs
    return model


def tutorial_run(kind, data, epochs, batch_size, teacher_state: Optional[dict] = None, seed=42):
    """One tutorial-style job; returns (seconds, test accuracy, final state_dict)."""
    started = time.perf_counter()
    train_loader, test_loader = tutorial_loaders(data, batch_size)
    teacher = None
    if teacher_state is not None:
        teacher = as_written(DeepNN())
        teacher.load_state_dict(teacher_state)
    torch.manual_seed(seed)
    model = as_written(DeepNN() if kind == "teacher" else LightNN())
    regressor = nn.Conv2d(16, 32, kernel_size=3, padding=1) if kind == "regressor" else None
    tutorial_train(model, teacher, train_loader, epochs, "ce" if kind in ("teacher", "ce") else kind,
                   regressor=regressor)
    accuracy = tutorial_test(model, test_loader)
    return time.perf_counter() - started, accuracy, model.state_dict()


def tutorial_pipeline(data: ImageData, epochs: int, batch_size: int, seed: int) -> dict:
    """The five tutorial-style jobs; its students learn from its own teacher."""
    rows, accuracy = {}, {}
    seconds, accuracy["teacher"], teacher_state = tutorial_run("teacher", data, epochs, batch_size, seed=seed)
    rows["tutorial teacher run"] = seconds
    print(f"  {'tutorial teacher run':<44} {seconds:9.1f} s    test/acc {accuracy['teacher']:.2f}", flush=True)
    for kind in KINDS[1:]:
        seconds, accuracy[kind], _ = tutorial_run(
            kind, data, epochs, batch_size, None if kind == "ce" else teacher_state, seed=seed)
        rows[f"tutorial {kind} run"] = seconds
        print(f"  {f'tutorial {kind} run':<44} {seconds:9.1f} s    test/acc {accuracy[kind]:.2f}", flush=True)
    return {"seconds": rows, "accuracy": accuracy}


def baseline_command(data_overrides: list[str], epochs: int, batch_size: int, seed: int, out: Path) -> list[str]:
    """The command of a baseline process: `tutorial_pipeline` on the data `data_overrides` give,
    its numbers written to `out` as JSON."""
    request = {"data_overrides": data_overrides, "epochs": epochs, "batch_size": batch_size, "seed": seed,
               "out": str(out)}
    return [sys.executable, "-m", __spec__.name, json.dumps(request)]


def main(request: dict) -> None:
    from kdresearch.reports.evaluation import compose

    data = build(compose(request["data_overrides"]).data, "data")
    numbers = tutorial_pipeline(data, request["epochs"], request["batch_size"], request["seed"])
    Path(request["out"]).write_text(json.dumps(numbers))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
