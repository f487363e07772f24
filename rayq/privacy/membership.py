"""Membership inference: how much a model, or one client's update, says about who was in training.

In the membership game a fair coin picks a training sample or a fresh one; the Bayes-optimal
attacker wins with P* = ½ + ½·TV between the two observation laws (Del Grosso, Pichler, Palamidessi,
Piantanida, Neurocomputing 2023). Cheap attacks bound P* from below:

* the correctness attack of Yeom, Giacomelli, Fredrikson, Jha (IEEE CSF 2018), "member iff
  classified correctly", wins with exactly ½ + ½(acc_train − acc_test) on a balanced set;
* the loss-threshold attack (same paper), scored by ROC AUC and TPR at 1% FPR, the low-FPR
  operating point advocated by Carlini et al. (IEEE S&P 2022);
* for federated updates, gradient alignment: the cosine between a client's decoded update and a
  candidate sample's gradient, larger for samples in the client's batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import nn


def _scores(x: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; the attack needs at least one sample of each kind")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds non-finite values")
    return t


def roc_auc(member_scores: torch.Tensor | Sequence[float], nonmember_scores: torch.Tensor | Sequence[float]) -> float:
    """P(score_member > score_nonmember) + ½·P(tie): the Mann–Whitney form of the area under the ROC
    curve for "higher score means member"."""
    m, n = _scores(member_scores, "member scores"), _scores(nonmember_scores, "non-member scores")
    both = torch.cat([m, n])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, both.numel() + 1, dtype=torch.float64)
    values, inverse = both.unique(return_inverse=True)
    mean_rank = torch.zeros_like(values).index_add_(0, inverse, ranks) / torch.bincount(inverse).to(torch.float64)
    r = mean_rank[inverse][: m.numel()].sum()
    return float((r - m.numel() * (m.numel() + 1) / 2) / (m.numel() * n.numel()))


def tpr_at_fpr(member_scores: torch.Tensor | Sequence[float], nonmember_scores: torch.Tensor | Sequence[float],
               fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold rule "member iff score > t" whose false-positive
    rate on the non-members is at most ``fpr``."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr={fpr} must be in [0, 1]")
    m, n = _scores(member_scores, "member scores"), _scores(nonmember_scores, "non-member scores")
    allowed = math.floor(fpr * n.numel() + 1e-9)      # non-members allowed above the threshold
    if allowed >= n.numel():
        return 1.0
    threshold = n.sort(descending=True).values[allowed]   # strictly above it: at most `allowed` non-members
    return float((m > threshold).double().mean())


@dataclass(frozen=True)
class ThresholdAttack:
    """A score-threshold membership attack on a balanced member/non-member set."""

    auc: float
    tpr_at_1pct_fpr: float
    best_accuracy: float     # best balanced accuracy over all thresholds
    threshold: float         # the score threshold achieving it ("member iff score > threshold")


def threshold_attack(member_scores: torch.Tensor | Sequence[float],
                     nonmember_scores: torch.Tensor | Sequence[float]) -> ThresholdAttack:
    """Evaluate "member iff score > t" at every t: AUC, TPR at 1% FPR and the best balanced accuracy."""
    m, n = _scores(member_scores, "member scores"), _scores(nonmember_scores, "non-member scores")
    candidates = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), torch.cat([m, n]).unique()])
    # members above t and non-members at or below t, by binary search in the sorted scores: O(n log n)
    tpr = 1.0 - torch.searchsorted(m.sort().values, candidates, right=True).double() / m.numel()
    tnr = torch.searchsorted(n.sort().values, candidates, right=True).double() / n.numel()
    accuracy = 0.5 * (tpr + tnr)
    best = int(accuracy.argmax())
    return ThresholdAttack(auc=roc_auc(m, n), tpr_at_1pct_fpr=tpr_at_fpr(m, n, 0.01),
                           best_accuracy=float(accuracy[best]), threshold=float(candidates[best]))


def loss_threshold_attack(member_losses: torch.Tensor | Sequence[float],
                          nonmember_losses: torch.Tensor | Sequence[float]) -> ThresholdAttack:
    """Yeom et al.'s loss attack: "member iff loss < τ", i.e. the score is −loss."""
    return threshold_attack(-_scores(member_losses, "member losses"), -_scores(nonmember_losses, "non-member losses"))


def correctness_attack_accuracy(member_correct: torch.Tensor | Sequence[bool],
                                nonmember_correct: torch.Tensor | Sequence[bool]) -> float:
    """Balanced accuracy of "member iff classified correctly": ½·P(correct | member) + ½·P(wrong | non-member),
    which equals ½ + ½(acc_train − acc_test) (Yeom et al. 2018, with the 0-1 loss)."""
    m = _scores(torch.as_tensor(member_correct).double(), "member correctness")
    n = _scores(torch.as_tensor(nonmember_correct).double(), "non-member correctness")
    return float(0.5 * m.mean() + 0.5 * (1.0 - n.mean()))


def yeom_bound(train_accuracy: float, test_accuracy: float) -> float:
    """½ + ½(acc_train − acc_test): the correctness attack's success, a lower bound on P*."""
    return 0.5 + 0.5 * (train_accuracy - test_accuracy)


def gaussian_threshold_success(mean_gap: float) -> float:
    """Φ(|μ₁ − μ₀|/2): the success of the midpoint threshold between N(μ₁, 1) and N(μ₀, 1) scores, which
    is P* for an observer of the score alone (Neyman–Pearson: the likelihood ratio is monotone)."""
    return NormalDist().cdf(abs(mean_gap) / 2.0)


@dataclass(frozen=True)
class MembershipReport:
    """Everything cheap to log at an evaluation: the generalisation gap and three attacks' success."""

    train_accuracy: float
    test_accuracy: float
    train_loss: float
    test_loss: float
    correctness_attack: float
    loss_attack: ThresholdAttack
    members: int
    nonmembers: int

    @property
    def accuracy_gap(self) -> float:
        return self.train_accuracy - self.test_accuracy

    @property
    def loss_gap(self) -> float:
        return self.test_loss - self.train_loss


@torch.no_grad()
def per_sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and correctness of every sample."""
    logits = model(x)
    return nn.functional.cross_entropy(logits, y, reduction="none"), logits.argmax(dim=-1) == y


def membership_report(model: nn.Module, members: tuple[torch.Tensor, torch.Tensor],
                      nonmembers: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> MembershipReport:
    """Evaluate on a balanced set: the larger of (members, non-members) is subsampled to the smaller's
    size with a generator seeded by ``seed``, so the attack accuracies are balanced accuracies."""
    (xm, ym), (xn, yn) = members, nonmembers
    k = min(len(ym), len(yn))
    if k == 0:
        raise ValueError(f"need members and non-members; got {len(ym)} and {len(yn)}")
    g = torch.Generator().manual_seed(seed)
    im, inn = torch.randperm(len(ym), generator=g)[:k], torch.randperm(len(yn), generator=g)[:k]
    was_training = model.training
    model.eval()
    try:
        lm, cm = per_sample_losses(model, xm[im], ym[im])
        ln, cn = per_sample_losses(model, xn[inn], yn[inn])
    finally:
        model.train(was_training)
    return MembershipReport(train_accuracy=float(cm.double().mean()), test_accuracy=float(cn.double().mean()),
                            train_loss=float(lm.mean()), test_loss=float(ln.mean()),
                            correctness_attack=correctness_attack_accuracy(cm, cn),
                            loss_attack=loss_threshold_attack(lm, ln), members=k, nonmembers=k)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The flattened loss gradient of every sample, (n, #parameters), vectorised with ``torch.func``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[k].reshape(x.shape[0], -1) for k in params], dim=1)


@dataclass(frozen=True)
class AlignmentAttack:
    """Gradient alignment against one client's update: cosines, and the threshold attack on them."""

    member_cosines: tuple[float, ...]
    nonmember_cosines: tuple[float, ...]
    attack: ThresholdAttack


def gradient_alignment_attack(update: torch.Tensor, member_grads: torch.Tensor,
                              nonmember_grads: torch.Tensor) -> AlignmentAttack:
    """Score each candidate by cos(update, ∇ℓ(candidate)) and threshold it: samples in the client's
    batch pull its update towards their own gradient. ``update`` is the decoded update, flattened
    like the per-sample gradients (rows of ``member_grads``/``nonmember_grads``)."""
    u = update.reshape(-1).double()
    for what, g in (("member", member_grads), ("non-member", nonmember_grads)):
        if g.dim() != 2 or g.shape[1] != u.numel():
            raise ValueError(f"{what} gradients must be (samples, {u.numel()}); got {tuple(g.shape)}")
    cm = nn.functional.cosine_similarity(member_grads.double(), u.unsqueeze(0), dim=1)
    cn = nn.functional.cosine_similarity(nonmember_grads.double(), u.unsqueeze(0), dim=1)
    return AlignmentAttack(tuple(cm.tolist()), tuple(cn.tolist()), threshold_attack(cm, cn))


_PROBE_PURPOSE = 0x4D454D42


@dataclass(frozen=True, eq=False)
class MembershipProbe:
    """A fixed, balanced member / non-member set, scored at every evaluation of a training run.

    Members are a seeded subset of the training split (every training sample is in some worker's shard),
    non-members as many test samples; the figures are those of :func:`membership_report`, named as the
    run's TensorBoard tags.
    """

    members: tuple[torch.Tensor, torch.Tensor]
    nonmembers: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def sample(cls, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], samples: int,
               seed: int = 0) -> MembershipProbe:
        """``min(samples, len(train), len(test))`` of each, drawn with a generator seeded by ``seed``."""
        from compressors.base import mix_seed

        k = min(samples, len(train[1]), len(test[1]))
        if k < 1:
            raise ValueError(f"a membership probe needs samples; got {len(train[1])} train and {len(test[1])} test")
        g = torch.Generator().manual_seed(mix_seed(seed, _PROBE_PURPOSE))
        im, it = torch.randperm(len(train[1]), generator=g)[:k], torch.randperm(len(test[1]), generator=g)[:k]
        return cls((train[0][im], train[1][im]), (test[0][it], test[1][it]))

    def metrics(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """``privacy/train_test_gap`` (accuracy, members − non-members), ``privacy/correctness_attack_acc``,
        ``privacy/loss_auc``, ``privacy/tpr_at_1pct_fpr`` and ``privacy/loss_gap`` of ``model`` now."""
        (xm, ym), (xn, yn) = self.members, self.nonmembers
        r = membership_report(model, (xm.to(device), ym.to(device)), (xn.to(device), yn.to(device)))
        return {"privacy/train_test_gap": r.accuracy_gap, "privacy/loss_gap": r.loss_gap,
                "privacy/correctness_attack_acc": r.correctness_attack, "privacy/loss_auc": r.loss_attack.auc,
                "privacy/tpr_at_1pct_fpr": r.loss_attack.tpr_at_1pct_fpr}
