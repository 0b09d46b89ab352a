"""Which of several failed ranks a launch names (sge_repro.launch.errors.root_cause)."""

from sge_repro.launch.errors import RankFailure, is_peer_failure, root_cause

# What gloo raised in the ranks that lost their peer (torch 2.14, seen in the launcher tests).
CLOSED = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
          "peer [127.0.0.1]:49384. This is typically caused by a remote worker crashing. Check the logs of the remote "
          "worker before reporting an error. GLHF!")
RESET = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
         "[127.0.0.1]:54687: Connection reset by peer. This is typically caused by a remote worker hanging or bugs "
         "in the application.")
NCCL = ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3356, remote process exited or there "
        "was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or "
        "a remote process exiting prematurely.")


def test_errors_that_say_a_peer_went_away():
    assert is_peer_failure(CLOSED) and is_peer_failure(RESET) and is_peer_failure(NCCL)
    assert not is_peer_failure("ValueError: the data is not there")
    assert not is_peer_failure("")  # died without an error (a signal): its own failure


def test_a_rank_s_own_error_before_one_that_lost_its_peer_then_the_earliest():
    own = RankFailure(1, "ValueError: the data is not there", time=10.6)
    assert root_cause([RankFailure(0, CLOSED, time=10.0), own]) == own
    assert root_cause([RankFailure(0, "KeyError: 'x'", time=10.0), own]).rank == 0
    assert root_cause([RankFailure(0, "KeyError: 'x'"), own]) == own  # an unknown time comes last
    assert root_cause([RankFailure(2, CLOSED, time=11.0), RankFailure(0, RESET, time=12.0)]).rank == 2
    assert root_cause([RankFailure(3, "", time=5.0), RankFailure(1, "", time=5.0)]).rank == 1
