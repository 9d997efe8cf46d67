import pytest
import torch

from megarope.mcore.context_parallel import (
    cp_local_indices,
    cp_local_indices_thd,
    slice_bshd,
    slice_thd,
)


def test_indices_cp1_is_identity():
    assert cp_local_indices(12, 1, 0).tolist() == list(range(12))


def test_indices_cp2():
    assert cp_local_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_local_indices(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_indices_cp4_chunks_and_partition():
    per_rank = [cp_local_indices(16, 4, r).tolist() for r in range(4)]
    assert per_rank == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert sorted(sum(per_rank, [])) == list(range(16))


def test_indices_at_2m_tokens_are_local_only():
    seq_len, cp = 2_097_152, 8
    index = cp_local_indices(seq_len, cp, 3)
    chunk = seq_len // (2 * cp)
    # exactly the rank's two chunks, S/cp entries: nothing of the other ranks' positions is built
    expected = torch.cat([torch.arange(3 * chunk, 4 * chunk), torch.arange((2 * cp - 4) * chunk, (2 * cp - 3) * chunk)])
    assert index.dtype == torch.long and index.numel() == seq_len // cp
    assert torch.equal(index, expected)


@pytest.mark.parametrize("seq_len, cp", [(10, 2), (12, 4), (7, 1)])
def test_indices_reject_indivisible_length(seq_len, cp):
    with pytest.raises(ValueError, match=rf"sequence length {seq_len} .*parallel\.cp"):
        cp_local_indices(seq_len, cp, 0)


def test_indices_reject_bad_rank_and_size():
    with pytest.raises(ValueError, match="parallel.cp"):
        cp_local_indices(8, 2, 2)
    with pytest.raises(ValueError, match="parallel.cp"):
        cp_local_indices(8, 0, 0)


def test_slice_bshd_follows_tokens():
    b, s = 2, 16
    batch = {
        "tokens": torch.arange(b * s).view(b, s),
        "labels": torch.arange(b * s).view(b, s) + 1000,
        "loss_mask": torch.rand(b, s),
        "position_ids": torch.arange(s).expand(b, s),
        "attention_mask": torch.ones(b, 1, s, s, dtype=torch.bool).tril(),
        "num_tokens": torch.tensor(b * s),
        "extra": None,
    }
    out = slice_bshd(batch, cp_size=4, cp_rank=1)
    index = torch.tensor([2, 3, 12, 13])
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        torch.testing.assert_close(out[key], batch[key][:, index])
    torch.testing.assert_close(out["attention_mask"], batch["attention_mask"][:, :, index])
    assert out["num_tokens"] is batch["num_tokens"] and out["extra"] is None


def test_slice_bshd_errors():
    with pytest.raises(ValueError, match=r"sequence length 6 .*parallel\.cp"):
        slice_bshd({"tokens": torch.zeros(1, 6)}, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="tokens"):
        slice_bshd({"input_ids": torch.zeros(1, 8)}, cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="labels"):
        slice_bshd({"tokens": torch.zeros(1, 8), "labels": torch.zeros(1, 7)}, 2, 0)


def test_slice_thd_pads_each_sequence_and_resets_positions():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)  # lengths 5 and 7 -> padded 8 and 8 at cp=2
    tokens = torch.arange(1, 13).view(1, 12)
    batch = {
        "tokens": tokens,
        "labels": tokens + 100,
        "loss_mask": torch.ones(1, 12),
        "position_ids": torch.full((1, 12), -7),
    }
    parts = [slice_thd(batch, cu, 2, r, pad_values={"labels": -100}) for r in range(2)]
    # Padded packing: seq0 = 1..5 + 3 pads, seq1 = 6..12 + 1 pad; rank r takes chunks r, 3 - r.
    assert parts[0].tensors["tokens"].tolist() == [[1, 2, 0, 0, 6, 7, 12, 0]]
    assert parts[1].tensors["tokens"].tolist() == [[3, 4, 5, 0, 8, 9, 10, 11]]
    assert parts[0].tensors["position_ids"].tolist() == [[0, 1, 6, 7, 0, 1, 6, 7]]
    assert parts[1].tensors["position_ids"].tolist() == [[2, 3, 4, 5, 2, 3, 4, 5]]
    assert parts[0].tensors["labels"].tolist() == [[101, 102, -100, -100, 106, 107, 112, -100]]
    assert parts[1].tensors["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1]]
    for part in parts:
        assert part.cu_seqlens.tolist() == [0, 4, 8] and part.cu_seqlens.dtype == torch.int32
        assert part.cu_seqlens_padded.tolist() == [0, 8, 16]


def test_slice_thd_matches_thd_indices_on_packed_dim0():
    cu = torch.tensor([0, 3, 3, 20])  # an empty sequence too
    q = torch.randn(20, 2, 4)
    for rank in range(4):
        part = slice_thd({"q": q}, cu, 4, rank, seq_dim=0)
        assert part.cu_seqlens_padded.tolist() == [0, 8, 8, 32]
        index = cp_local_indices_thd(part.cu_seqlens_padded, 4, rank)
        q_padded = torch.cat([q[:3], q.new_zeros(5, 2, 4), q[3:], q.new_zeros(7, 2, 4)])
        torch.testing.assert_close(part.tensors["q"], q_padded[index])
        assert part.tensors["position_ids"].shape == (part.cu_seqlens[-1],)


def test_slice_thd_errors():
    with pytest.raises(ValueError, match="tokens"):
        slice_thd({"tokens": torch.zeros(1, 9)}, torch.tensor([0, 4, 8]), 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        slice_thd({"tokens": torch.zeros(1, 8)}, torch.tensor([0, 6, 4, 8]), 2, 0)
    with pytest.raises(ValueError, match=r"packed sequence 1.*parallel\.cp"):
        cp_local_indices_thd(torch.tensor([0, 8, 14]), 2, 0)
