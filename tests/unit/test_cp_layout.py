import pytest
import torch

from megarope.mcore.context_parallel import (
    cp_local_indices,
    cp_local_indices_thd,
    slice_bshd,
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


def test_thd_indices_apply_the_rule_per_padded_sequence():
    # padded lengths 8 and 8 at cp=2: rank r takes chunks r and 3 - r of each sequence
    cu_padded = torch.tensor([0, 8, 16])
    assert cp_local_indices_thd(cu_padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert cp_local_indices_thd(cu_padded, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    cu_padded = torch.tensor([0, 8, 8, 32])  # an empty sequence too
    for rank in range(4):
        expected = torch.cat([cp_local_indices(8, 4, rank), 8 + cp_local_indices(24, 4, rank)])
        assert torch.equal(cp_local_indices_thd(cu_padded, 4, rank), expected)
    with pytest.raises(ValueError, match=r"packed sequence 1.*parallel\.cp"):
        cp_local_indices_thd(torch.tensor([0, 8, 14]), 2, 0)
