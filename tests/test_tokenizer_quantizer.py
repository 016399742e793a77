"""NormEMA quantizer: hand-computed EMA step, straight-through gradients, dead-code restart, k-means on 2 ranks."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenizer.quantizer import NormEMAQuantizer, cosine_kmeans


def hand_quantizer() -> NormEMAQuantizer:
    quantizer = NormEMAQuantizer(num_codes=3, code_dim=2, beta=1.0, decay=0.5, kmeans_init=False)
    quantizer.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return quantizer


def test_ema_update_matches_hand_computed_example():
    quantizer = hand_quantizer().train()
    z = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]]])  # unit vectors -> codes 1, 0, 0
    z_q, loss, codes = quantizer(z)
    assert codes.tolist() == [[1, 0, 0]]
    # z_q uses the codebook before the update; MSE over 6 elements: (0.36 + 0.04 + 0 + 0.04 + 0.36) / 6
    assert torch.allclose(z_q, torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]]))
    assert loss.item() == pytest.approx(0.8 / 6, abs=1e-6)
    # code 0: mean of (1,0),(0.8,0.6) -> l2norm(1.8,0.6) = (0.94868,0.31623); l2norm(0.5*(1,0)+0.5*mean)
    # code 1: l2norm(0.5*(0,1)+0.5*(0.6,0.8)) = l2norm(0.3,0.9); code 2 unused: unchanged
    expected = torch.tensor([[0.98708, 0.16018], [0.31623, 0.94868], [-1.0, 0.0]])
    assert torch.allclose(quantizer.embedding.weight, expected, atol=1e-4)
    assert torch.allclose(quantizer.cluster_size, torch.tensor([1.0, 0.5, 0.0]))


def test_straight_through_gradients_and_eval_is_frozen():
    quantizer = hand_quantizer().train()
    z = torch.randn(2, 5, 2, requires_grad=True)
    z_q, loss, _ = quantizer(z)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    quantizer.eval()
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer(torch.randn(2, 5, 2))
    assert all(torch.equal(before[k], v) for k, v in quantizer.state_dict().items())


def test_dead_code_restart_reseeds_unused_codes():
    torch.manual_seed(0)
    quantizer = NormEMAQuantizer(num_codes=4, code_dim=2, decay=0.99, kmeans_init=False, restart_after_steps=2)
    quantizer.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    quantizer.train()
    data = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.1], [1.0, -0.1], [0.9, 0.2], [1.0, 0.0]]]), dim=-1)
    quantizer(data)
    assert torch.equal(quantizer.embedding.weight[2], torch.tensor([-1.0, 0.0]))  # idle 1 step: not yet
    quantizer(data)
    for code in (1, 2, 3):  # idle 2 steps: re-seeded with one of the current encodings
        distance = (data[0] - quantizer.embedding.weight[code]).norm(dim=-1).min()
        assert distance < 1e-6
    assert quantizer.steps_unused[1:].eq(0).all()


def test_cosine_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.eye(4)
    samples = torch.nn.functional.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(200, 4), dim=-1)
    means, bins = cosine_kmeans(samples, 4, 10)
    assert sorted(bins.tolist()) == [50, 50, 50, 50]
    assert ((means @ centres.t()).max(dim=0).values > 0.99).all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different data and different k-means draws on each rank
    quantizer = NormEMAQuantizer(num_codes=16, code_dim=4, kmeans_init=True).train()
    quantizer(torch.randn(2, 32, 4))
    after_init = quantizer.embedding.weight.clone()
    for _ in range(3):
        quantizer(torch.randn(2, 32, 4))
    gathered = [torch.zeros(2, 16, 4) for _ in range(2)]
    dist.all_gather(gathered, torch.stack([after_init, quantizer.embedding.weight]))
    usage = [torch.zeros(16) for _ in range(2)]
    dist.all_gather(usage, quantizer.cluster_size)
    if rank == 0:
        out["codebooks"] = torch.stack(gathered)
        out["usage"] = torch.stack(usage)
    dist.destroy_process_group()


@pytest.mark.slow
def test_kmeans_init_and_ema_are_identical_on_two_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_rank_worker, args=(_free_port(), out), nprocs=2, join=True)
        codebooks, usage = out["codebooks"], out["usage"]
    assert torch.equal(codebooks[0, 0], codebooks[1, 0])  # k-means result broadcast from rank 0
    assert torch.equal(codebooks[0, 1], codebooks[1, 1])  # all-reduced EMA keeps them identical
    assert not torch.equal(codebooks[0, 0], codebooks[0, 1])
    assert torch.equal(usage[0], usage[1]) and usage[0].sum() > 0
