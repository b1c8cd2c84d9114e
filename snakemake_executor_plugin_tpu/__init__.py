"""Snakemake executor plugin `tpu`: run jobs that ask for `resources: tpu="<slice>"` on a TPU slice.

Slices are defined in YAML (`--tpu-slices-config FILE`, key `slices:`; default: the workflow
config's `slices`). Each host of a multi-host slice is started with the trainer's environment
protocol (TRAINER_COORDINATOR / TRAINER_NUM_PROCESSES / TRAINER_PROCESS_ID): host 0 runs the
Snakemake job, hosts 1..N-1 run the slice's follower command (`python -m trainer follow`). Jobs
without the resource run as local subprocesses. See docs/executor.md.
"""

import dataclasses
import os
import shlex
import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncGenerator, List, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.real import RealExecutor
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase

from snakemake_executor_plugin_tpu.local_backend import LocalBackend, free_port, trainer_env
from snakemake_executor_plugin_tpu.runner import JobRun, SlicePool
from snakemake_executor_plugin_tpu.slices import (
    SliceConfigError, SliceSpec, load_slices_file, parse_slices, placement, requested_slice,
)

__all__ = ["ExecutorSettings", "common_settings", "Executor", "placement", "SliceSpec"]


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    slices_config: Optional[str] = field(
        default=None,
        metadata={"help": "YAML file with a top-level `slices:` mapping (slice name -> accelerator, hosts, "
                          "backend, ...). Default: `slices` of the workflow config."},
    )
    allow_dirty: bool = field(
        default=False,
        metadata={"help": "Run on tpu-vm slices even if the git tree has uncommitted changes (the hosts run "
                          "the last commit; the changes are not shipped)."},
    )
    require_backend: Optional[str] = field(
        default=None,
        metadata={"help": "Refuse to start if a slice uses another backend (the TPU profile sets tpu-vm, so a "
                          "config mix-up never trains on local CPU processes by accident)."},
    )
    status_interval: float = field(
        default=0.5,
        metadata={"help": "Seconds between Snakemake's checks of job results (cheap: workers are watched "
                          "by a thread per job at the slice's poll_interval_s)."},
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,  # the local backend shares the directory; the TPU profile says none
    job_deploy_sources=False,  # hosts get the code by git (exact commit), not by a source archive
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=True,
    auto_deploy_default_storage_provider=False,  # hosts' environments come from setup_command
    init_seconds_before_status_checks=0,
)


class Executor(RemoteExecutor):
    def __post_init__(self):
        settings = self.workflow.executor_settings
        self.settings = settings if settings is not None else ExecutorSettings()
        self.slices = self._load_slices()
        self.pool = SlicePool()
        # Every run this executor started: cancel stops them all, even one that Snakemake's status
        # loop holds outside `active_jobs` at that moment (it takes the list out while it checks).
        self._runs: list[JobRun] = []
        self.run_id = uuid.uuid4().hex[:6]  # keeps tags of reruns apart (jobids restart at 1)
        self.next_seconds_between_status_checks = self.settings.status_interval
        self._job_spec = threading.local()
        self._git = None
        self._slice_states: dict = {}
        wanted = self.settings.require_backend
        wrong = [s.slice_id for s in self.slices.values() if wanted and s.backend != wanted]
        if wrong:
            raise WorkflowError(f"tpu executor: slice(s) {', '.join(wrong)} do not use backend {wanted} "
                                "(--tpu-require-backend); check the slices config the profile points to")
        tpu_vm = [s for s in self.slices.values() if s.backend == "tpu-vm" and s.code_sync != "none"]
        if tpu_vm:
            self._git_state()  # fail fast on a dirty tree, before any job starts
        for spec in self.slices.values():
            self.logger.info(f"tpu executor: {spec.describe()}")

    # ---------------------------------------------------------------- configuration
    def _load_slices(self) -> dict[str, SliceSpec]:
        try:
            if self.settings.slices_config:
                return load_slices_file(self.settings.slices_config)
            config = getattr(self.workflow, "config", None) or {}
            return parse_slices(config.get("slices"), "workflow config")
        except SliceConfigError as e:
            raise WorkflowError(str(e)) from None

    def _git_state(self):
        if self._git is None:
            from snakemake_executor_plugin_tpu.gitsync import check_clean, git_state, paths_not_committed

            try:
                state = git_state(".")
                warning = check_clean(state, self.settings.allow_dirty)
            except SliceConfigError as e:
                raise WorkflowError(str(e)) from None
            # host 0's job reads the --configfile overlays from its checkout of the commit
            missing = paths_not_committed(state, getattr(self.workflow, "overwrite_configfiles", None) or [])
            if missing:
                raise WorkflowError(
                    f"tpu executor: config file(s) {', '.join(missing)} are not in commit {state.sha[:12]}; TPU VM "
                    "hosts read --configfile files from their checkout of that commit, so add and commit them "
                    "(inside the repository)")
            if warning:
                self.logger.info(f"tpu executor: WARNING: {warning}")
            self._git = state
        return self._git

    def job_slice(self, job: JobExecutorInterface) -> SliceSpec | None:
        """The slice of a job; `resources: tpu_hosts=1` runs it on host 0 alone (no followers), e.g.
        the checkpoint upload on the host that holds the checkpoint."""
        try:
            spec = requested_slice(job.name, job.resources, self.slices)
        except SliceConfigError as e:
            raise WorkflowError(str(e)) from None
        if spec is not None and str(job.resources.get("tpu_hosts", "")) == "1" and spec.hosts > 1:
            spec = dataclasses.replace(spec, hosts=1)
        return spec

    # ---------------------------------------------------------------- the job command
    # format_job_exec() calls these without the job; _job_spec carries the slice of the job being formatted.
    def _spec(self) -> SliceSpec | None:
        return getattr(self._job_spec, "spec", None)

    def get_python_executable(self):
        spec = self._spec()
        return spec.python_exe if spec is not None else sys.executable

    def get_job_exec_prefix(self, job: JobExecutorInterface):
        spec = self._spec()
        if spec is not None and spec.backend == "tpu-vm":
            return ""  # the start script cd's into the host's checkout
        return f"cd {shlex.quote(self.workflow.workdir_init)}"

    def get_job_args(self, job: JobExecutorInterface, **kwargs):
        spec = self._spec()
        if spec is not None and spec.backend == "tpu-vm":
            # no --wait-for-files: they name this machine's paths, which a TPU host does not have
            return RealExecutor.get_job_args(self, job, **kwargs)
        return super().get_job_args(job, **kwargs)

    def get_snakefile(self):
        spec = self._spec()
        if spec is not None and spec.backend == "tpu-vm":
            return os.path.relpath(self.workflow.main_snakefile)  # same place in the host's checkout
        return super().get_snakefile()

    def host0_command(self, job: JobExecutorInterface, spec: SliceSpec | None) -> str:
        self._job_spec.spec = spec
        try:
            return self.format_job_exec(job)
        finally:
            self._job_spec.spec = None

    # ---------------------------------------------------------------- run / check / cancel
    def run_job(self, job: JobExecutorInterface):
        spec = self.job_slice(job)
        label = f"job {job.jobid} ({job.name})"
        command = self.host0_command(job, spec)
        if spec is None:
            backend = LocalBackend(label, self._jobdir(job), self.workflow.workdir_init, [command], [{}])
        elif spec.backend == "local":
            backend = self._local_slice_backend(label, job, spec, command)
        else:
            backend = self._tpuvm_backend(label, job, spec, command)
        run = JobRun(label, spec, backend, log=self.logger.info)
        job_info = SubmittedJobInfo(job=job, external_jobid=f"{self.run_id}-{job.jobid}", aux={"run": run})
        if spec is not None:
            self.logger.info(f"tpu executor: {label} -> {spec.describe()}")
        self._runs = [r for r in self._runs if not r.done] + [run]
        waiting_for = self.pool.submit(run)
        if waiting_for:
            self.logger.info(f"tpu executor: {label} queued until {waiting_for} frees slice '{spec.slice_id}'")
        self.report_job_submission(job_info)

    def _jobdir(self, job: JobExecutorInterface) -> str:
        return os.path.join(self.workflow.workdir_init, ".snakemake", "tpu", str(job.jobid))

    def _local_slice_backend(self, label, job, spec: SliceSpec, command: str) -> LocalBackend:
        coordinator = f"127.0.0.1:{free_port()}" if spec.hosts > 1 else None
        extra = dict(spec.env, SIDRL_SLICE=spec.slice_id)
        envs = [trainer_env(coordinator, spec.hosts, w, extra) for w in range(spec.hosts)]
        commands = [command] + [spec.follower_cmd()] * (spec.hosts - 1)
        if spec.env_file:
            from snakemake_executor_plugin_tpu.gcloud import source_env_file

            commands = [f"{source_env_file(spec.env_file)}; {c}" for c in commands]
        return LocalBackend(label, self._jobdir(job), self.workflow.workdir_init, commands, envs)

    def _tpuvm_backend(self, label, job, spec: SliceSpec, command: str):
        from snakemake_executor_plugin_tpu.gitsync import GitState
        from snakemake_executor_plugin_tpu.tpuvm_backend import SliceState, TpuVmBackend

        git = self._git_state() if spec.code_sync != "none" else GitState(".", "", "HEAD", [])
        state = self._slice_states.setdefault(spec.slice_id, SliceState(self.slices[spec.slice_id].hosts))
        tag = f"sidrl-{self.run_id}-{job.name}-{job.jobid}"
        command_log = os.path.join(self._tpu_dir(), "logs", f"{tag}.gcloud.log")
        self.logger.info(f"tpu executor: {label}: gcloud commands go to {os.path.relpath(command_log)}")
        return TpuVmBackend(label, spec, tag, command, git, state, bundle_dir=os.path.join(self._tpu_dir(), "bundles"),
                            inputs=[str(f) for f in job.input], outputs=[str(f) for f in job.output],
                            log=self.logger.info, command_log=command_log)

    def _tpu_dir(self) -> str:
        return os.path.join(self.workflow.workdir_init, ".snakemake", "tpu")

    def shutdown(self):
        super().shutdown()
        self._delete_created_vms()

    def _delete_created_vms(self) -> None:
        """provision.delete_after: delete the VMs of the slices this run used, if this executor created
        them (label created-by=sidrl-executor); a VM someone else created is never deleted."""
        from snakemake_executor_plugin_tpu import lifecycle
        from snakemake_executor_plugin_tpu.runner import JobFailure

        for slice_id, state in self._slice_states.items():
            spec = self.slices[slice_id]
            if not (spec.provision and spec.provision.delete_after):
                continue
            label = f"slice '{slice_id}'"
            cmds = lifecycle.CommandLog(os.path.join(self._tpu_dir(), "logs", f"sidrl-{self.run_id}-lifecycle.gcloud.log"))
            try:
                zone, info = lifecycle.find(cmds, spec, label)
                if info is None:
                    continue
                if not lifecycle.created_here(info):
                    self.logger.info(f"tpu executor: {label}: TPU VM {spec.name} in {zone} was not created by this "
                                     "executor; delete_after leaves it running")
                    continue
                lifecycle.delete(cmds, spec, zone, label, lambda m: self.logger.info(f"tpu executor: {m}"))
            except JobFailure as e:
                self.logger.error(f"tpu executor: delete_after: {e} (see {cmds.path}); delete the VM by hand")

    async def check_active_jobs(self, active_jobs: List[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        for job_info in active_jobs:
            run: JobRun = job_info.aux["run"]
            outcome = run.outcome
            if outcome is None:
                yield job_info
            elif outcome.ok:
                self.report_job_success(job_info)
            else:
                self.report_job_error(job_info, msg=outcome.message + "\n")

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]):
        runs = [ji.aux["run"] for ji in active_jobs]
        runs += [r for r in self._runs if r not in runs and not r.done]
        for run in runs:  # queued ones first, so none of them starts on a slice being freed
            if self.pool.dequeue(run):
                run.cancel()
        threads = []
        for run in runs:
            if not run.done:
                t = threading.Thread(target=run.cancel, daemon=True)
                t.start()
                threads.append(t)
        for t in threads:
            t.join(90)
