"""The GPU fault record (actors/device_health.py) and the crash journal's use of it, as plain Python: a broken
GPU is quarantined and its images are not blamed; a poison image is blamed and never quarantines a good GPU."""

from actors.device_health import DeviceRecord
from actors.guard import CrashJournal

GPU_A = {"node": "a" * 56, "gpus": ["0"]}
GPU_B = {"node": "b" * 56, "gpus": ["0"]}
BATCH = ["i0", "i1", "i2", "i3"]


def test_a_gpu_whose_fresh_process_fails_is_quarantined_and_its_deaths_are_not_held_against_images():
    j = CrashJournal(max_device_faults=3)
    assert j.begin("k", GPU_A)["attempts"] == 1
    j.device_fault(GPU_A, BATCH, "AcceleratorError: illegal memory access")  # the whole batch's call
    assert j.device_state(GPU_A) == "suspect", "one fault: the GPU or an image, not known yet"
    state = j.begin("k", GPU_A)  # the retry, one image at a time, on the same GPU
    assert state["attempts"] == 2 and not state["quarantined"]
    j.trying("k", "i0")
    j.device_fault(GPU_A, ["i0"], "AcceleratorError")
    state = j.begin("k", GPU_B)  # the next attempt, elsewhere: i0 died once on a GPU still suspect
    assert state["crashes"] == {"i0": 1}
    j.device_fault(GPU_A, [], "self-test: CUDA error")  # the restarted process on GPU A fails on no image
    assert j.device_state(GPU_A) == "quarantined" and j.excluded_nodes() == [GPU_A["node"]]
    assert j.begin("k", GPU_B)["crashes"] == {"i0": 0}, "a death on a quarantined GPU blames no image"
    assert j.begin("k2", GPU_A)["quarantined"], "an actor still on GPU A learns it must stop"
    assert [q["node"] for q in j.quarantined()] == [GPU_A["node"]] and "self-test" in j.quarantined()[0]["last_error"]


def _poison_batch(j: CrashJournal, n: int, gpu: dict) -> None:
    """Batch n holds one poison image: the whole call fails, then the image alone, which is then blamed."""
    batch = [f"b{n}-{k}" for k in range(4)]
    poison = batch[2]
    j.begin(f"k{n}", gpu)
    j.device_fault(gpu, batch, "AcceleratorError")  # the whole batch's call
    j.device_passed(gpu)  # the restarted process passes the self-test
    j.begin(f"k{n}", gpu)
    j.trying(f"k{n}", poison)  # ... and dies on the poison image alone
    j.device_fault(gpu, [poison], "AcceleratorError")
    j.device_passed(gpu)
    assert j.begin(f"k{n}", gpu)["crashes"] == {poison: 1}
    j.blame(f"k{n}", poison)  # guarded_call gives it a WorkerCrashed row
    j.end(f"k{n}")  # ... and the others of the batch finish


def test_poison_images_are_blamed_and_never_quarantine_a_good_gpu():
    j = CrashJournal(max_device_faults=3)
    for n in range(5):
        _poison_batch(j, n, GPU_A)
    assert j.device_state(GPU_A) != "quarantined" and j.quarantined() == [] and j.pending() == 0
    assert not j.devices.faults and not j.devices.blamed_here, "each finished batch cleared the GPU's record"


def test_bare_deaths_are_never_held_against_a_gpu():
    """A host OOM or native crash (no device error reported): only the images are suspected."""
    j = CrashJournal(max_device_faults=1)
    for n in range(4):
        j.begin(f"k{n}", GPU_A)
        j.begin(f"k{n}", GPU_A)  # the first attempt died
        j.trying(f"k{n}", f"x{n}")
    assert j.device_state(GPU_A) == "ok" and j.quarantined() == []


def test_a_gpu_that_fails_under_load_is_quarantined_after_images_are_blamed_there_in_a_row():
    """It passes the self-test, so each image it gets fails alone too and is blamed: after max_faults of them
    with no batch finishing there in between, the GPU is the culprit."""
    j = CrashJournal(max_device_faults=3)
    j.begin("k", GPU_A)
    j.device_fault(GPU_A, BATCH, "AcceleratorError")
    for n, image in enumerate(BATCH[:3]):
        j.begin("k", GPU_A)
        j.trying("k", image)
        j.device_fault(GPU_A, [image], "AcceleratorError")
        j.device_passed(GPU_A)
        assert j.begin("k", GPU_A)["crashes"][image] == 1
        j.blame("k", image)
    assert j.device_state(GPU_A) == "quarantined" and "in a row" in j.quarantined()[0]["last_error"]


def test_unexplained_faults_with_different_images_quarantine_a_gpu_that_passes_its_self_test():
    r = DeviceRecord(max_faults=3)
    key = ["n:gpu0"]
    assert not r.fault(key, ["a", "b", "c", "d"], "e")
    assert not r.fault(key, ["a"], "e"), "one of that batch's images: the same explanation"
    assert not r.fault(key, ["b"], "e"), "a second, different image"
    r.passed(key)
    assert r.status(key) == "ok"
    assert r.fault(key, ["z"], "e") and r.status(key) == "quarantined", "three different images failed on it"
    assert r.report()[0]["gpu"] == "0" and r.report()[0]["faults"] == 4
    r2 = DeviceRecord(max_faults=3)
    r2.fault(key, ["a"], "e")
    r2.fault(key, ["b"], "e")
    r2.finished(key)  # a batch finished there in between
    assert not r2.fault(key, ["c"], "e")
