"""The training loop: phases (head warm-up, fine-tune, recovery, scratch), early stopping on validation
accuracy, the best checkpoint kept, per-epoch history, seeded and repeatable, CUDA when present."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from edge_tl.core.errors import EdgeTLError
from edge_tl.workstation.train import distributed as dist
from edge_tl.workstation.train.backbones import is_head_param


@dataclass
class Phase:
    """One stretch of training. ``lr_backbone=None`` freezes the backbone (only the head trains)."""

    name: str
    epochs: int
    lr_head: float
    lr_backbone: float | None
    train_bn: bool = False
    early_stop: bool = True
    #: BatchNorm running-statistics momentum during this phase (None: the model's own). torchvision's
    #: MobileNetV3 uses 0.01, meant for ImageNet's many steps: after ~100 steps from scratch its running
    #: statistics are still mostly the initial ones and the net scores chance in eval mode (train top-1 100%,
    #: val 33.3% on 3 classes); 0.1 (PyTorch's default) tracks them within a few dozen steps
    bn_momentum: float | None = None
    #: how the head trains when the backbone is frozen: "sgd" (``epochs`` epochs of AdamW at ``lr_head``) or
    #: "lbfgs" (fitted once to its optimum on the frozen features: :mod:`edge_tl.workstation.train.head`; the
    #: phase counts as one epoch)
    solver: str = "sgd"
    #: solver "lbfgs": augmented copies of each training image whose features the head is fitted on as well
    views: int = 0


#: without a terminal (a log file, CI, `| tee`) training prints a plain line at most this often (and at the first and
#: last epoch) instead of a progress bar, which rich draws only on a terminal (issue 23)
PLAIN_EVERY_S = 10.0


@dataclass
class FitResult:
    best_val_top1: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)
    #: processes that trained it (torchrun, edge-tl build --nproc); the global batch is the same for any number
    processes: int = 1
    #: which weights the model holds at the end: "best" (the best epoch on validation) or "last"
    kept: str = "best"
    #: the best epoch's weights (None before any epoch): kept for the record, never written (as_dict leaves it out)
    best_state: dict | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        d = asdict(replace(self, best_state=None))
        del d["best_state"]
        return d


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgeTLError("train.device is 'cuda' but no CUDA GPU is visible to torch", "use --device auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu",
             batch: int = 256) -> tuple[float, float, np.ndarray]:
    """(top-1, mean cross-entropy, predictions) of ``model`` on preprocessed arrays."""
    model.eval()
    preds, loss = [], 0.0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch]).to(device)
        yb = torch.from_numpy(y[i:i + batch]).to(device)
        logits = model(xb)
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        preds.append(logits.argmax(1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    n = max(len(y), 1)
    return float((pred == y).mean()) if len(y) else 0.0, loss / n, pred


def evaluate_shared(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[float, float]:
    """(top-1, mean cross-entropy) like :func:`evaluate`; under torchrun each rank scores every N-th image and
    the counts are summed over the ranks, so every rank gets the same numbers (and decides alike)."""
    n, r = dist.world_size(), dist.rank()
    if n == 1:
        top1, loss, _ = evaluate(model, x, y, device=device)
        return top1, loss
    xs, ys = x[r::n], y[r::n]
    top1, loss, _ = evaluate(model, xs, ys, device=device)
    correct, loss_sum = dist.all_sum(top1 * len(ys), loss * len(ys), device=device)
    return round(correct) / max(len(y), 1), loss_sum / max(len(y), 1)


def _optimizer(model: nn.Module, backbone: str, phase: Phase, weight_decay: float) -> torch.optim.Optimizer:
    head, body = [], []
    for name, p in model.named_parameters():
        (head if is_head_param(backbone, name) else body).append(p)
        p.requires_grad = is_head_param(backbone, name) or phase.lr_backbone is not None
    groups = [{"params": head, "lr": phase.lr_head}]
    if phase.lr_backbone is not None:
        groups.append({"params": body, "lr": phase.lr_backbone})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def _set_train_mode(model: nn.Module, phase: Phase) -> None:
    model.train()
    frozen_body = phase.lr_backbone is None
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (frozen_body or not phase.train_bn):
            mod.eval()


def _set_bn_momentum(model: nn.Module, phase: Phase) -> None:
    """Phase.bn_momentum on every BatchNorm; kept after the phase (the model's statistics came from it)."""
    if phase.bn_momentum is None:
        return
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = phase.bn_momentum


def fit(model: nn.Module, backbone: str, train_ds: torch.utils.data.Dataset, val: tuple[np.ndarray, np.ndarray],
        phases: list[Phase], *, batch_size: int = 32, weight_decay: float = 1e-4, patience: int = 8,
        label_smoothing: float = 0.0, seed: int = 0, device: str = "auto", workers: int = 0,
        label: str = "train", teacher: nn.Module | None = None, distill_weight: float = 0.0,
        distill_temperature: float = 4.0, sampler: torch.utils.data.Sampler | None = None,
        loss_fn: nn.Module | None = None, keep: str = "best", mixup: float = 0.0,
        distill_on: str = "logits") -> FitResult:
    """Train ``model`` in place through ``phases``; at the end it holds the best-on-val weights (``keep =
    "best"``) or those of the last epoch (``keep = "last"``: the recovery after pruning, whose cosine schedule
    ends at a learning rate of zero; the best of its epochs on a hundred validation images is partly noise).

    With a ``teacher`` (the unpruned model, for the recovery after pruning) the loss blends the labels'
    cross-entropy with knowledge distillation (Hinton et al. 2015): ``distill_weight`` x T^2 x
    KL(teacher || student) at temperature T. The teacher's soft outputs on the augmented images carry far
    more signal than a few labels, so the pruned net recovers closer to the accuracy it had.

    ``mixup`` > 0 trains on mixed images (Zhang et al. 2018): each batch is blended with a shuffled copy of
    itself at a weight drawn from Beta(mixup, mixup), the labels' loss weighted alike. With a teacher this is
    Beyer et al. 2022's "function matching": the teacher labels every blend, so a hundred photos give the
    student far more points of the teacher's function to match than their own few labels.

    ``distill_on = "features"`` (with a ``teacher``: the recovery of a model whose head was fitted on frozen
    features, :mod:`edge_tl.workstation.train.head`) distils what the classifiers see instead of their
    outputs (Romero et al. 2015, FitNets): the loss is the mean squared error between the teacher's features and
    the student's (through a linear map trained alongside where pruning narrowed the student's), no labels; after
    every epoch the head is fitted again on the student's features of the training images (L-BFGS), so that
    validation scores the network as it stands. The labels enter through that fit only.

    ``distill_on = "blocks"`` adds a hint at every block's output (the residual stream, whose width pruning only
    the blocks' hidden channels keeps): the loss is the mean over those outputs and the features of each one's
    squared error divided by the teacher's mean square there, so that every block is taught where it stands, not
    only through the last layer (FitNets' hints at many depths; Li et al. 2020, "Few Sample Knowledge
    Distillation", recover a pruned net block by block from a few images).

    ``sampler`` replaces the shuffled order (class-balanced sampling) and ``loss_fn`` the cross-entropy
    (class-weighted or focal loss): see :mod:`edge_tl.workstation.train.balance`.

    Under torchrun (:mod:`edge_tl.workstation.train.distributed`) every rank runs this with the same arguments:
    each trains on its shard with ``batch_size / N`` images per step (DDP averages the gradients, so a step is
    the single process's step on the global batch), augmentation and dropout are seeded ``seed + rank``, and
    validation counts are summed over the ranks so that early stopping and the best epoch agree everywhere.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    dev = dist.place(pick_device(device))
    torch.manual_seed(seed + dist.rank())  # rank 0 (and the single process) draws exactly as before
    np.random.seed((seed + dist.rank()) % (2**32))
    model.to(dev)
    loader = dist.loader(train_ds, batch_size, seed=seed, sampler=sampler, workers=workers)
    loss_fn = (loss_fn or nn.CrossEntropyLoss(label_smoothing=label_smoothing)).to(dev)
    _check_blend(distill_weight, mixup, distill_on)
    kd = teacher is not None and (distill_weight > 0 or distill_on in FEATURE_TARGETS)
    mix_rng = np.random.default_rng((seed + 7919 * dist.rank()) % (2**32)) if mixup > 0 else None
    feat_kd = kd and distill_on in FEATURE_TARGETS
    if kd:
        teacher = teacher.to(dev).eval()  # its forward runs under no_grad (_distill_loss)
    grab = _FeatureDistiller(model, teacher, backbone, dev, blocks=distill_on == "blocks") if feat_kd else None
    best = _Best()
    epoch, stale, stopped = 0, 0, False
    history: list[dict] = []
    start = time.perf_counter()
    total = sum(p.epochs for p in phases)
    plain = dist.is_writer() and not sys.stderr.isatty()  # a log, CI or `| tee`: lines instead of a bar
    said = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), transient=False, disable=not dist.is_writer() or plain,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, status="")
        for phase in phases:
            if phase.epochs <= 0:
                continue
            if phase.solver == "lbfgs":  # the frozen backbone's head, to its optimum: one step
                epoch += 1
                history.append(_head_phase(model, backbone, train_ds, val, phase, seed, dev, epoch,
                                           label if plain else None))
                best.offer(model, epoch, history[-1]["val_top1"], history[-1]["val_loss"])
                bar.update(task, advance=1, status=f"{phase.name} (L-BFGS) val {history[-1]['val_top1']:.3f}")
                continue
            opt = _optimizer(model, backbone, phase, weight_decay)
            _set_bn_momentum(model, phase)
            step = _Step(opt, loss_fn, mix_rng, mixup, label, phase.name)
            if grab is not None:  # the head is fitted after each epoch, never by a gradient (nor synced by DDP)
                step.features = (grab, grab.attach(model, backbone, opt, phase, dev))
            elif kd:
                step.logits = (teacher, distill_weight, distill_temperature)
            net = dist.wrap(model, dev)  # after _optimizer: DDP syncs the parameters this phase trains
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs)
            stale = 0
            for _ in range(phase.epochs):
                t0 = time.perf_counter()
                _set_train_mode(model, phase)
                dist.set_epoch(loader, epoch)
                seen, correct, loss_sum = step.epoch(net, loader, dev, epoch)
                sched.step()
                epoch += 1
                dist.sync_buffers(model)
                if grab is not None:  # the head, fitted again on the features as they now are
                    from edge_tl.workstation.train.head import fit_head

                    fit_head(model, backbone, train_ds, views=0, seed=seed, device=dev)
                seen, correct, loss_sum = dist.all_sum(seen, correct, loss_sum, device=dev)
                val_top1, val_loss = evaluate_shared(model, *val, device=dev)
                history.append({"epoch": epoch, "phase": phase.name, "train_loss": loss_sum / max(seen, 1),
                                "train_top1": correct / max(seen, 1), "val_loss": val_loss, "val_top1": val_top1,
                                "seconds": time.perf_counter() - t0})
                stale = 0 if best.offer(model, epoch, val_top1, val_loss) else stale + 1
                status = f"{phase.name} val {val_top1:.3f} (best {best.score[0]:.3f} @{best.epoch})"
                bar.update(task, advance=1, status=status)
                if plain and (time.perf_counter() - said >= PLAIN_EVERY_S or epoch in (1, total)):
                    said = time.perf_counter()
                    print(f"  {label}: epoch {epoch}/{total}, {status}, {said - start:.0f} s", file=sys.stderr,
                          flush=True)
                if phase.early_stop and stale >= patience:
                    stopped = True
                    bar.update(task, completed=total)
                    break
            if stopped:
                break
    if grab is not None:
        grab.remove()
    if best.state is not None and keep == "best":
        model.load_state_dict(best.state)
    for p in model.parameters():
        p.requires_grad = True
    model.eval()
    return FitResult(best_val_top1=best.score[0], best_epoch=best.epoch, epochs_run=epoch, stopped_early=stopped,
                     seconds=time.perf_counter() - start, device=str(dev), history=history,
                     processes=dist.world_size(), kept=keep, best_state=best.state)


class _Best:
    """The best epoch so far on validation (top-1, then the lower loss) and a copy of its weights."""

    def __init__(self) -> None:
        self.score, self.epoch, self.state = (-1.0, float("inf")), 0, None

    def offer(self, model: nn.Module, epoch: int, val_top1: float, val_loss: float) -> bool:
        if (val_top1, -val_loss) <= (self.score[0], -self.score[1]):
            return False
        self.score, self.epoch = (val_top1, val_loss), epoch
        self.state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        return True


def _head_phase(model: nn.Module, backbone: str, train_ds, val: tuple[np.ndarray, np.ndarray], phase: Phase,
                seed: int, dev: torch.device, epoch: int, say: str | None) -> dict:
    """Phase.solver = "lbfgs": the head fitted once (edge_tl.workstation.train.head); its history entry. ``say``:
    the label of a plain line to print (no terminal), else None."""
    from edge_tl.workstation.train.head import fit_head

    t0 = time.perf_counter()
    got = fit_head(model, backbone, train_ds, views=phase.views, seed=seed, device=dev)
    val_top1, val_loss = evaluate_shared(model, *val, device=dev)
    if say is not None:
        print(f"  {say}: head fitted by L-BFGS on {got.images} feature vectors in {got.seconds:.1f} s, val "
              f"{val_top1:.3f}", file=sys.stderr, flush=True)
    return {"epoch": epoch, "phase": phase.name, "train_loss": None, "train_top1": got.train_top1,
            "val_loss": val_loss, "val_top1": val_top1, "seconds": time.perf_counter() - t0,
            "head_fit": got.as_dict()}


class _Step:
    """One epoch of gradient steps: the labels' loss (mixup optional), or distillation of the teacher's logits
    blended with it (``logits``), or of its features alone (``features``)."""

    def __init__(self, opt: torch.optim.Optimizer, loss_fn: nn.Module, mix_rng, mixup: float, label: str,
                 phase: str) -> None:
        self.opt, self.loss_fn, self.mix_rng, self.mixup = opt, loss_fn, mix_rng, mixup
        self.label, self.phase = label, phase
        self.logits: tuple | None = None  # (teacher, weight, temperature)
        self.features: tuple | None = None  # (_FeatureDistiller, its map as trained: DDP-wrapped or not)

    def epoch(self, net: nn.Module, loader, dev: torch.device, epoch: int) -> tuple[int, int, float]:
        seen, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            xb, logits, loss = _forward(net, xb, yb, self.loss_fn, self.mix_rng, self.mixup)
            if self.features is not None:
                loss = self.features[0].loss(self.features[1], xb)
            elif self.logits is not None:
                teacher, weight, temperature = self.logits
                loss = (1 - weight) * loss + weight * _distill_loss(logits, teacher, xb, temperature)
            if not torch.isfinite(loss):  # diverged: stop now, not after the remaining epochs
                raise EdgeTLError(f"{self.label}: the training loss became {float(loss)} in epoch {epoch + 1} "
                                  f"({self.phase})", "training diverged: lower the learning rates "
                                  "(--lr-head, --lr-backbone, or prune.recovery_lr in the spec)")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            seen += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
        return seen, correct, loss_sum


#: distillation targets that teach what the classifier sees (the head is fitted again on it, not trained)
FEATURE_TARGETS = ("features", "blocks")


class _FeatureDistiller:
    """What the student's and the teacher's classifiers see (forward hooks on their heads), and the linear map
    from the student's width to the teacher's (FitNets' regressor), trained with the student and dropped after.
    With ``blocks`` also every block's output (edge_tl.workstation.prune.blocks), which must keep the
    teacher's shape (prune.channels = "hidden")."""

    def __init__(self, model: nn.Module, teacher: nn.Module, backbone: str, dev: torch.device,
                 blocks: bool = False):
        from edge_tl.workstation.prune import blocks as block_list
        from edge_tl.workstation.train.backbones import head_name

        self.seen: dict[tuple[str, str], torch.Tensor] = {}
        head = head_name(backbone)
        self.names = [head] + ([n for n, _ in block_list(teacher)] if blocks else [])
        self.hooks = [m.get_submodule(name).register_forward_hook(self._keep(who, name, name == head))
                      for name in self.names for who, m in (("student", model), ("teacher", teacher))]
        self.teacher = teacher
        width = {who: m.get_submodule(head).in_features for who, m in (("student", model), ("teacher", teacher))}
        # equal widths (prune.channels = "hidden" keeps them): compared as they are, with no map to learn first
        self.proj = (nn.Identity() if width["student"] == width["teacher"]
                     else nn.Linear(width["student"], width["teacher"]).to(dev))
        if blocks and not isinstance(self.proj, nn.Identity):
            raise EdgeTLError("block-wise distillation needs the pruned blocks to keep their output width",
                              "prune only the hidden channels (prune.channels = 'hidden') or distil 'features'")

    def attach(self, model: nn.Module, backbone: str, opt: torch.optim.Optimizer, phase: Phase,
               dev: torch.device) -> nn.Module:
        """For one phase: the head out of the gradient steps, the map's weights into ``opt``; returns the map as
        the steps call it (in DistributedDataParallel under torchrun)."""
        for name, prm in model.named_parameters():
            prm.requires_grad = prm.requires_grad and not is_head_param(backbone, name)
        if not list(self.proj.parameters()):
            return self.proj
        opt.add_param_group({"params": list(self.proj.parameters()),
                             "lr": phase.lr_backbone if phase.lr_backbone is not None else phase.lr_head})
        return dist.wrap(self.proj, dev)

    def _keep(self, who: str, name: str, is_head: bool):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            self.seen[who, name] = inp[0].flatten(1) if is_head else out
        return hook

    def loss(self, proj: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        """After the student's forward on ``xb``: the squared error between its mapped features and the
        teacher's; with blocks, the mean over every hooked output of that error over the teacher's mean square."""
        with torch.no_grad():
            self.teacher(xb)
        head = self.names[0]
        feats = nn.functional.mse_loss(proj(self.seen["student", head]), self.seen["teacher", head])
        if len(self.names) == 1:
            return feats
        terms = [feats / self.seen["teacher", head].pow(2).mean().clamp_min(1e-8)]
        for name in self.names[1:]:
            t = self.seen["teacher", name]
            terms.append(nn.functional.mse_loss(self.seen["student", name], t) / t.pow(2).mean().clamp_min(1e-8))
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _check_blend(distill_weight: float, mixup: float, distill_on: str = "logits") -> None:
    if distill_on not in ("logits", *FEATURE_TARGETS):
        raise EdgeTLError(f"unknown distillation target {distill_on!r}", "use 'logits', 'features' or 'blocks'")
    if not 0.0 <= distill_weight <= 1.0:
        raise EdgeTLError(f"distill weight {distill_weight} is outside [0, 1]", "use e.g. 0.7, or 0 to turn it off")
    if mixup < 0:
        raise EdgeTLError(f"mixup {mixup} is negative", "use e.g. 1.0, or 0 to turn it off")


def _forward(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss_fn: nn.Module,
             mix_rng: np.random.Generator | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the images the net saw, logits, labels' loss): mixup blends the batch with a shuffled copy of itself."""
    if mix_rng is None or len(yb) < 2:
        logits = net(xb)
        return xb, logits, loss_fn(logits, yb)
    lam = float(mix_rng.beta(alpha, alpha))
    perm = torch.from_numpy(mix_rng.permutation(len(yb))).to(xb.device)
    xb = lam * xb + (1 - lam) * xb[perm]
    logits = net(xb)
    return xb, logits, lam * loss_fn(logits, yb) + (1 - lam) * loss_fn(logits, yb[perm])


def _distill_loss(logits: torch.Tensor, teacher: nn.Module, xb: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        soft = nn.functional.log_softmax(teacher(xb) / temperature, dim=1)
    student = nn.functional.log_softmax(logits / temperature, dim=1)
    kl = nn.functional.kl_div(student, soft, reduction="batchmean", log_target=True)
    return kl * temperature**2


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: torch.utils.data.Dataset, passes: int = 4, batch_size: int = 32,
                   seed: int = 0, device: str = "auto") -> int:
    """Re-estimate every BatchNorm's running mean/var on ``dataset`` (cumulative average over ``passes``
    augmented passes). After channel pruning the layers after a pruned one see other inputs, so their stored
    statistics are stale; this restores them before the recovery fine-tune. Returns the images seen."""
    dev = pick_device(device)
    model.to(dev)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    seen = 0
    for _ in range(passes):
        for xb, _ in loader:
            model(xb.to(dev))
            seen += len(xb)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()
    return seen


def finetune_phases(mode: str, epochs: int, warmup_epochs: int, lr_head: float, lr_backbone: float,
                    freeze_bn: bool, head: str = "sgd", head_views: int = 4) -> list[Phase]:
    """The phases of the two transfer-learning modes. ``head = "lbfgs"``: feature extraction fits its head once,
    to the optimum, on the frozen features of the training images and ``head_views`` augmented copies of each."""
    if mode == "feature-extract":
        if head == "lbfgs":
            return [Phase("head", 1, lr_head, None, early_stop=False, solver="lbfgs", views=head_views)]
        return [Phase("head", epochs, lr_head, None)]
    phases = [Phase("warmup", warmup_epochs, lr_head, None, early_stop=False)] if warmup_epochs else []
    return phases + [Phase("finetune", epochs, lr_head, lr_backbone, train_bn=not freeze_bn)]


def scratch_phases(epochs: int, lr: float) -> list[Phase]:
    """From random weights every layer learns at one rate and BatchNorm statistics must train. No early
    stopping: a net from scratch idles at chance for a while, and the baseline gets its whole budget (the best
    val checkpoint is still kept). BatchNorm momentum 0.1 (see :attr:`Phase.bn_momentum`)."""
    return [Phase("scratch", epochs, lr, lr, train_bn=True, early_stop=False, bn_momentum=0.1)]


def recovery_phases(epochs: int, lr: float, freeze_bn: bool) -> list[Phase]:
    """The recovery after pruning runs its whole budget: on small validation sets early stopping fired on noise
    and kept an under-recovered net (benchmarks/RESULTS.md, demo seeds). Which epoch's weights it keeps is
    ``prune.recovery_keep`` (:func:`fit`'s ``keep``)."""
    return [Phase("recovery", epochs, lr, lr, train_bn=not freeze_bn, early_stop=False)]
