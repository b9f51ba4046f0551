"""What an attempt runs on (DESIGN §11 "What bit for bit means"): the conditions under which a
resumed job's records equal its uninterrupted run's bit for bit. Each attempt records them
with its first flush; the JobView compares them (services/store/jobs.py)."""

import functools
import platform

import torch

from services.schemas import AttemptEnvironment


@functools.cache
def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what `platform` knows, else "cpu"
    (no torch here: the worker's main process names its CPU with it too)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def attempt_environment(
    attempt: int, device: torch.device, stepper: str, worker: str
) -> AttemptEnvironment:
    """This process's conditions for `attempt` on `device`, running its steps by `stepper`."""
    on_gpu = device.type == "cuda"
    return AttemptEnvironment(
        attempt=attempt,
        device="cuda" if on_gpu else "cpu",
        device_name=torch.cuda.get_device_name(device) if on_gpu else cpu_model(),
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        stepper=stepper,
        worker=worker,
    )
