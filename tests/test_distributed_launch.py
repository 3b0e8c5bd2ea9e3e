"""What a job's process derives from how it was started: torchrun's restarts (--max-restarts) and
srun's tasks (hydra/launcher=slurm). Fast: environments are faked and jobs run in-process; the
real torchrun processes are in test_distributed.py (-m slow). There is no SLURM cluster here: the
mapping of SLURM's variables and the sbatch script the launcher would submit are what is tested."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from conftest import assert_resumed_exactly, compose_config, compose_job, interrupted_after_epoch_1, mlflow_client

from kdresearch.errors import KDResearchError
from kdresearch.runtime import distributed
from kdresearch.training.job import run_job

TINY = ("debug=tiny", "epochs=2")


# --- torchrun --max-restarts --------------------------------------------------------------------

def test_a_restarted_job_continues_its_run_from_its_folder(store, monkeypatch):
    """A process torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) continues the job in its folder
    as resume=<folder> would: the same MLflow run, from the newest checkpoint, to the same result.
    In a folder where the failed start left nothing, it starts the job."""
    job = run_job(compose_job(store, *TINY), store / "job")
    client = mlflow_client(store)
    folder = interrupted_after_epoch_1(client, job, store / "restarted")

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = run_job(compose_job(store, *TINY), folder)
    assert restarted.run_id == job.run_id
    assert client.get_run(job.run_id).info.status == "FINISHED"
    assert_resumed_exactly(job.checkpoint, restarted.checkpoint)

    fresh = run_job(compose_job(store, *TINY), store / "never-started")
    assert fresh.run_id != job.run_id and client.get_run(fresh.run_id).info.status == "FINISHED"


def test_restart_count_and_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert distributed.init("cpu") == distributed.World(restart=2)
    assert distributed.restart_count({}) == 0


def test_a_restartable_job_needs_a_folder_that_stays_the_same():
    restartable = {"TORCHELASTIC_MAX_RESTARTS": "3"}
    with pytest.raises(KDResearchError, match=r"^torchrun --max-restarts: give the job's folder, e.g. hydra.run.dir="
                                              r"outputs/my-job .* hydra.run.dir=outputs/\$\{now:%Y-%m-%d\}/"):
        distributed.check_restartable(OmegaConf.to_container(compose_config(hydra=True).hydra.run)["dir"], restartable)
    distributed.check_restartable("/scratch/imagenet-res18", restartable)
    distributed.check_restartable("outputs/${now:%H}", {"TORCHELASTIC_MAX_RESTARTS": "0"})  # no restart: any folder


# --- srun's tasks -------------------------------------------------------------------------------

SRUN_TASK = {  # task 11 of 16 that srun started over 2 nodes x 8 GPUs (hydra/launcher=slurm)
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_srun_tasks_find_rank_world_and_rank_0s_node_in_slurms_variables():
    assert distributed.slurm_env(SRUN_TASK) == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu007", "MASTER_PORT": "24242"}
    # Every task of the job agrees on the port; another job on the node draws another one.
    assert distributed.slurm_env({**SRUN_TASK, "SLURM_PROCID": "0"})["MASTER_PORT"] == "24242"
    assert distributed.slurm_env({**SRUN_TASK, "SLURM_JOB_ID": "4243"})["MASTER_PORT"] == "24243"
    # Addresses the user exported win; torchrun's variables win over SLURM's.
    assert distributed.slurm_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"})["MASTER_ADDR"] \
        == "10.0.0.7"
    assert distributed.slurm_env({**SRUN_TASK, "WORLD_SIZE": "16", "RANK": "11"}) == {}
    # One task (a single-GPU job, or the batch script itself, where SLURM_NTASKS counts the job's tasks):
    # a world of one.
    assert distributed.slurm_env({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    assert distributed.slurm_env({key: value for key, value in SRUN_TASK.items()
                                  if key != "SLURM_STEP_NUM_TASKS"}) == {}
    assert distributed.slurm_env({}) == {}
    with pytest.raises(KDResearchError, match="SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are unset"):
        distributed.slurm_env({key: value for key, value in SRUN_TASK.items() if "NODELIST" not in key})


@pytest.mark.parametrize("nodelist, first", [
    ("gpu007", "gpu007"), ("gpu[007-010,012],cpu1", "gpu007"), ("node3,node1", "node3"),
    ("n[12,3-5]", "n12"), ("rack[2-3]-n[01-04]", "rack2-n01"), ("gpu-[1-2].cluster", "gpu-1.cluster"),
])
def test_first_node_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_node(nodelist) == first


def test_slurm_launcher_asks_for_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script hydra/launcher=slurm submits for one job over 2 nodes x 8 GPUs (submitit's
    own script, captured before sbatch would run): 8 tasks per node, which srun starts."""
    import submitit.slurm.slurm as submitit_slurm
    from hydra.utils import instantiate

    scripts = []

    class Submitted(Exception):
        pass

    def capture(executor, command):
        scripts.append(executor._make_submission_file_text(command, "job"))
        raise Submitted

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is here"
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_submit_command", capture)
    config = compose_config("hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8",
                            f"hydra.sweep.dir={tmp_path}", hydra=True)
    assert config.hydra.launcher.tasks_per_node == 8
    assert compose_config("hydra/launcher=slurm", hydra=True).hydra.launcher.tasks_per_node == 1
    launcher = instantiate(config.hydra.launcher)
    launcher.config = config
    with pytest.raises(Submitted):
        launcher.launch([["experiment=imagenet_res34_res18"]], initial_job_idx=0)
    (script,) = scripts
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"} <= set(script.splitlines())
    assert any(line.startswith("srun ") for line in script.splitlines())
