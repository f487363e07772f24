"""Membership inference (T23): the Yeom identity, the Gaussian toy optimum, AUC and low-FPR figures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayq.privacy.membership import (
    correctness_attack_accuracy, gaussian_threshold_success, gradient_alignment_attack, loss_threshold_attack,
    membership_report, per_sample_gradients, roc_auc, threshold_attack, tpr_at_fpr, yeom_bound,
)

DRAWS = 20_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("train_acc,test_acc", [(0.95, 0.70), (0.6, 0.6), (0.5, 0.8)])
def test_correctness_attack_accuracy_is_one_half_plus_half_the_accuracy_gap(train_acc, test_acc):
    n, classes = 1000, 10
    g = gen(int(100 * train_acc + test_acc * 10))

    def predictions(acc: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        wrong = (y + torch.randint(1, classes, (n,), generator=g)) % classes
        right = torch.zeros(n, dtype=torch.bool)
        right[torch.randperm(n, generator=g)[: round(acc * n)]] = True
        return torch.where(right, y, wrong), y

    pm, ym = predictions(train_acc)
    pn, yn = predictions(test_acc)
    says_member = torch.cat([pm == ym, pn == yn])
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    attack_accuracy = (says_member == is_member).double().mean().item()   # balanced set: plain accuracy
    expected = yeom_bound((pm == ym).double().mean().item(), (pn == yn).double().mean().item())
    assert attack_accuracy == pytest.approx(expected, abs=1e-12)
    assert correctness_attack_accuracy(pm == ym, pn == yn) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("gap", [0.5, 1.0, 2.0])
def test_midpoint_threshold_on_gaussian_losses_wins_with_phi_of_half_the_gap(gap):
    g = gen(int(10 * gap))
    member = torch.randn(DRAWS, generator=g, dtype=torch.float64)            # N(0, 1) losses
    nonmember = gap + torch.randn(DRAWS, generator=g, dtype=torch.float64)  # N(Δ, 1)
    midpoint = gap / 2
    success = 0.5 * (member < midpoint).double().mean() + 0.5 * (nonmember >= midpoint).double().mean()
    p = gaussian_threshold_success(gap)
    sigma = math.sqrt(p * (1 - p) / (2 * DRAWS))
    assert abs(success.item() - p) < 3 * sigma
    assert loss_threshold_attack(member, nonmember).best_accuracy >= success.item() - 1e-12


def test_auc_of_identical_distributions_is_one_half():
    g = gen(1)
    a, b = torch.randn(DRAWS, generator=g), torch.randn(DRAWS, generator=g)
    sigma = math.sqrt((2 * DRAWS + 1) / (12 * DRAWS * DRAWS))   # Mann–Whitney under the null
    assert abs(roc_auc(a, b) - 0.5) < 3 * sigma


def test_auc_of_gaussian_scores_is_phi_of_gap_over_root_two():
    g = gen(2)
    a, b = 1.0 + torch.randn(DRAWS, generator=g), torch.randn(DRAWS, generator=g)
    assert roc_auc(a, b) == pytest.approx(0.5 * (1 + math.erf(0.5)), abs=0.01)


def test_auc_counts_ties_as_one_half():
    assert roc_auc([3.0, 2.0], [2.0, 1.0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_tpr_at_one_percent_fpr_allows_at_most_one_percent_of_non_members_above_the_threshold():
    members = torch.arange(100, 200, dtype=torch.float64)
    nonmembers = torch.arange(0, 100, dtype=torch.float64)
    assert tpr_at_fpr(members, nonmembers, 0.01) == 1.0
    shuffled = torch.arange(0, 200, dtype=torch.float64)
    # members 199 and 197 lie above the threshold 196; non-member 198 is the one false positive allowed
    assert tpr_at_fpr(shuffled[1::2], shuffled[0::2], 0.01) == pytest.approx(0.02)


def test_threshold_attack_finds_a_perfect_separation():
    result = threshold_attack([5.0, 6.0, 7.0], [1.0, 2.0])
    assert result.auc == 1.0 and result.best_accuracy == 1.0 and 2.0 <= result.threshold < 5.0


def test_threshold_attack_best_accuracy_matches_a_brute_force_search():
    g = gen(4)
    members, nonmembers = torch.randn(50, generator=g) + 0.7, torch.randn(40, generator=g)
    brute = max(0.5 * (members > t).double().mean() + 0.5 * (nonmembers <= t).double().mean()
                for t in torch.cat([members, nonmembers, torch.tensor([-math.inf])]))
    assert threshold_attack(members, nonmembers).best_accuracy == pytest.approx(brute.item(), abs=1e-12)


@pytest.fixture(scope="module")
def memoriser() -> tuple[nn.Module, tuple, tuple]:
    """An MLP fitted to 32 random points with random labels: members are fitted, others are chance."""
    g = gen(3)
    xm, ym = torch.randn(32, 10, generator=g), torch.randint(4, (32,), generator=g)
    xn, yn = torch.randn(32, 10, generator=g), torch.randint(4, (32,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xm), ym).backward()
        opt.step()
    return model, (xm, ym), (xn, yn)


def test_membership_report_of_a_memorising_model_shows_the_gap_and_the_attacks(memoriser):
    model, members, nonmembers = memoriser
    report = membership_report(model, members, nonmembers)
    assert report.train_accuracy == 1.0 and report.accuracy_gap > 0.4
    assert report.correctness_attack == pytest.approx(yeom_bound(report.train_accuracy, report.test_accuracy))
    assert report.loss_attack.auc > 0.9 and report.loss_gap > 0


def test_gradient_alignment_singles_out_the_samples_of_a_clients_batch(memoriser):
    _, (xm, ym), (xn, yn) = memoriser
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 4))   # fresh weights: large gradients
    batch = slice(0, 4)
    member_grads = per_sample_gradients(model, xm[batch], ym[batch])
    update = member_grads.mean(dim=0)          # the client's (uncompressed) update for its batch of 4
    result = gradient_alignment_attack(update, member_grads, per_sample_gradients(model, xn[:16], yn[:16]))
    assert result.attack.auc > 0.9
    assert min(result.member_cosines) > sorted(result.nonmember_cosines)[len(result.nonmember_cosines) // 2]


def test_per_sample_gradients_sum_to_the_batch_gradient(memoriser):
    model, (xm, ym), _ = memoriser
    per_sample = per_sample_gradients(model, xm[:8], ym[:8])
    model.zero_grad()
    nn.functional.cross_entropy(model(xm[:8]), ym[:8]).backward()
    batch = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(per_sample.mean(dim=0), batch, atol=1e-6)
