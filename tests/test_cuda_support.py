"""`sge-repro env --check`'s GPU judgement, on the facts a GPU machine would report."""

import pytest

from sge_repro.cuda_support import cuda_problem

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's list


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_a_gpu_with_kernels_in_the_build_is_fine(capability):
    assert cuda_problem(capability, CU130, "13.0", "13.0") is None


@pytest.mark.parametrize("capability, name", [((7, 0), "sm_70"), ((6, 1), "sm_61")])
def test_a_gpu_older_than_the_builds_kernels_says_the_way_out(capability, name):
    problem = cuda_problem(capability, CU130, "13.0", "13.0")
    assert problem.startswith(f"this GPU is {name}, and this torch (built for CUDA 13.0) has kernels for sm_75")
    assert "pip install torch==2.14.1 torchvision==0.29.1" in problem and "cu126" in problem
    # PTX of an older architecture is compiled by the driver for a newer GPU
    assert cuda_problem((12, 1), ["sm_80", "compute_90"], "12.6", "12.8") is None


@pytest.mark.parametrize("driver", ["12.2", "12.8", "11.8"])
def test_a_driver_older_than_the_builds_cuda_says_the_way_out(driver):
    problem = cuda_problem((9, 0), CU130, "13.0", driver)
    assert problem.startswith(f"the NVIDIA driver supports CUDA up to {driver}, this torch is built for CUDA 13.0")
    assert "update the driver" in problem and "cu126" in problem
    assert cuda_problem((9, 0), CU130, "13.0", "13.1") is None


def test_no_gpu_nothing_to_judge():
    assert cuda_problem(None, CU130, "13.0", None) is None
    assert cuda_problem(None, [], None, None) is None
