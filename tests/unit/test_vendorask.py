"""``hami submit --vendor``: the flags become the family's resources and its rules apply."""

from __future__ import annotations

import argparse

import pytest

from hami.cli import Fail, build_submit, parser
from hami.vendorask import family_named, vendor_ask


def test_a_family_by_type_in_any_case_or_by_resource_name() -> None:
    assert family_named("mlu").name == "MLU"
    assert family_named("huawei.com/Ascend910B3").name == "Ascend910B3"
    with pytest.raises(ValueError, match="'H100': no such device family"):
        family_named("H100")


def test_the_familys_own_rules_shape_the_ask() -> None:
    # Ascend: memory rounded up to the chip's smallest template that holds it.
    assert vendor_ask("Ascend910B3", 1, 10000, None, None).mem == 16384
    # Kunlunxin: a vXPU size, with the cores of that quarter of the card.
    xpu = vendor_ask("XPU", 1, 20000, None, None)
    assert (xpu.vendor, xpu.mem, xpu.cores) == ("XPU", 24576, 25)
    # Cambricon's memory resource counts 256 MiB units, as the pod's resource value would.
    assert vendor_ask("MLU", 1, 4, None, 50).mem == 4 * 256
    # A card count alone: the family's default (Neuron: a whole device's cores).
    neuron = vendor_ask("AWSNeuron", 1, None, None, None)
    assert (neuron.nums, neuron.mem, neuron.cores) == (1, 0, 2)


def test_a_flag_the_family_has_no_resource_for_is_refused() -> None:
    with pytest.raises(ValueError, match="Biren has no resource for --mem"):
        vendor_ask("Biren", 1, 1000, None, None)
    with pytest.raises(ValueError, match="Ascend910B3 has no resource for --mem-percent"):
        vendor_ask("Ascend910B3", 1, None, 50, None)


def test_submit_flags_build_the_vendor_ask() -> None:
    args = parser().parse_args(["submit", "infer", "--vendor", "Ascend910B3", "--mem", "30000"])
    req = build_submit(args)
    (ask,) = req.containers[0].devices
    assert (ask.vendor, ask.nums, ask.mem) == ("Ascend910B3", 1, 32768)
    plain = build_submit(parser().parse_args(["submit", "train", "--gpus", "2"]))
    assert (plain.containers[0].devices[0].vendor, plain.containers[0].devices[0].cores) == (
        "NVIDIA",
        100,
    )
    bad = parser().parse_args(["submit", "x", "--vendor", "Vastai", "--cores", "30"])
    assert isinstance(bad, argparse.Namespace)
    with pytest.raises(Fail, match="Vastai has no resource for --cores"):
        build_submit(bad)
