"""The code tables: derived in code, equal to bitsandbytes' tables."""

import bitsandbytes.functional as bnbF
import torch

from minilora.quant import NF4_CODE, derive_dynamic_code, derive_fp4_code, derive_nf4_code, get_code


def test_nf4_derived_from_normal_quantiles_matches_published_table():
    derived = derive_nf4_code()
    table = torch.tensor(NF4_CODE)
    assert (derived - table).abs().max() <= 1.2e-7
    assert derived[7] == 0 and derived[0] == -1 and derived[15] == 1
    assert int((derived > 0).sum()) == 8 and int((derived < 0).sum()) == 7  # the asymmetric split


def test_nf4_table_equals_bitsandbytes():
    assert torch.equal(get_code("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))


def test_fp4_table_equals_bitsandbytes_bit_for_bit():
    ours, theirs = derive_fp4_code(), bnbF.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_dynamic_map_equals_bitsandbytes_bit_for_bit():
    ours, theirs = derive_dynamic_code(), bnbF.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert ours.numel() == 256 and bool((ours[1:] >= ours[:-1]).all())
    assert abs(ours[0].item() + 0.99297) < 1e-5 and ours[-1] == 1.0 and bool((ours == 0).any())
