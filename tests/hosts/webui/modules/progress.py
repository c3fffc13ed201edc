"""Stand-in for `modules.progress`: the task queue bookkeeping behind `/internal/progress`."""

import time
from collections import OrderedDict

from modules import shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def record_results(id_task, res):
    recorded_results.append((id_task, res))


def progressapi(id_task):
    """What POST /internal/progress answers for `id_task` (the fields the page uses)."""
    active = id_task == current_task
    queued = id_task in pending_tasks
    completed = id_task in finished_tasks
    if not active:
        return {"active": False, "queued": queued, "completed": completed, "textinfo": "Waiting..."}
    state = shared.state
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += state.sampling_step / state.sampling_steps / state.job_count
    return {
        "active": True,
        "queued": queued,
        "completed": completed,
        "progress": min(progress, 1.0),
        "textinfo": state.textinfo,
        "id_live_preview": state.id_live_preview,
    }
