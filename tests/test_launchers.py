"""launch/tpu_vm.sh and launch/slurm_gpu.sbatch, without a cloud or a cluster.

`gcloud`, `scontrol`, `srun` and the training Python are replaced by small
recording stubs on PATH. The dry runs must print the right commands (parsed back
with shlex, so quoting is checked too) and touch nothing; the real runs must
issue the same commands, ship the right files, and give every SLURM task its
own process id and GPU.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
BASH = shutil.which("bash")

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
  answer = os.environ["FAKE_TPU_DESCRIBE"]
  if answer == "missing":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
             "'projects/p/locations/z/nodes/n' was not found")
  if answer == "denied":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED: "
             "Permission 'tpu.nodes.get' denied")
  print(answer)
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(os.path.dirname(os.environ["FAKE_LOG"]), "shipped.tar.gz"))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  print("worker output of", args[4])
"""

FAKE_SCONTROL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(["scontrol"] + sys.argv[1:]) + "\\n")
print(os.environ["FAKE_HOSTS"].replace(",", "\\n"))
"""

# Starts every task of the step the way srun does: same command, own
# SLURM_PROCID / SLURM_LOCALID.
FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(["srun"] + args) + "\\n")
while args[0].startswith("--"):
  args = args[1:]
tasks_per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
for process_id in range(int(os.environ["SLURM_NTASKS"])):
  env = dict(os.environ, SLURM_PROCID=str(process_id),
             SLURM_LOCALID=str(process_id % tasks_per_node))
  subprocess.run(args, env=env, check=True)
"""

# Stands in for .venv/bin/python: records what one task was given.
FAKE_PYTHON = """#!{python}
import json, os, sys
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
          "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}}
with open(os.path.join(os.environ["FAKE_TASKS"], os.environ["SLURM_PROCID"] + ".json"), "w") as f:
  json.dump(record, f)
"""


def write_executable(path, text):
  with open(path, "w") as f:
    f.write(text.format(python=sys.executable))
  os.chmod(path, 0o755)
  return str(path)


@pytest.fixture
def stubs(tmp_path):
  """A bin/ directory with the fake tools and the log they append to."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
  write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
  write_executable(bin_dir / "srun", FAKE_SRUN)
  return {"bin": str(bin_dir), "log": str(tmp_path / "calls.jsonl"), "dir": tmp_path}


def base_env(stubs, path=None, **extra):
  # From scratch, so TPU_NAME / WORKDIR / SLURM_* of the caller cannot leak in.
  env = {
    "PATH": path or stubs["bin"] + os.pathsep + os.environ["PATH"],
    "HOME": str(stubs["dir"]),
    "TMPDIR": str(stubs["dir"]),
    "LC_ALL": "C",
    "FAKE_LOG": stubs["log"],
  }
  env.update(extra)
  return env


def calls(stubs):
  if not os.path.exists(stubs["log"]):
    return []
  with open(stubs["log"]) as f:
    return [json.loads(line) for line in f]


def run_script(script, args, env):
  return subprocess.run([BASH, script, *args], env=env, capture_output=True, text=True, timeout=60)


# --- tpu_vm.sh ----------------------------------------------------------------

TPU_ARGS = [
  "--name",
  "ega-pod",
  "--zone=us-central2-b",
  "--project",
  "my-proj",
  "--accelerator",
  "v4-32",
  "--workdir",
  "gs://bucket/runs/ega",
  "--data_dir=gs://bucket/tfds",
  "--teacher",
  "gs://bucket/teachers/clip_vit_b32/",
]
OVERRIDES = [
  "--config.batch_size=512",
  "--config.lr_decay_epochs=(150, 180)",
  "--config.distill.method=it's",
]
TRAIN_ARGV = [
  ".venv/bin/python",
  "-m",
  "ega_jax.main",
  "--config=configs/cifar100.py",
  "--workdir=gs://bucket/runs/ega",
  "--config.dataset.data_dir=gs://bucket/tfds",
  "--config.teacher.checkpoint=teachers/clip_vit_b32",
] + OVERRIDES
GCLOUD_FLAGS = ["--zone=us-central2-b", "--project=my-proj"]


def printed_commands(stdout):
  """The dry run's lines, each split into words the way a shell would."""
  return [shlex.split(line) for line in stdout.strip().split("\n")]


def ssh_command(words):
  """For `gcloud ... ssh NAME ... --worker=all --command CMD`: CMD, else None."""
  if words[:5] != ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
    return None
  assert words[-3:-1] == ["--worker=all", "--command"], words
  return words[-1]


def assert_trains_on_all_workers(command, repo_dir="ega_jax", train_argv=TRAIN_ARGV):
  words = shlex.split(command)
  assert words[:3] == ["cd", repo_dir, "&&"], command
  assert words[3:] == train_argv


def test_scripts_parse_with_bash_n():
  for script in (TPU_VM, SLURM):
    result = subprocess.run([BASH, "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [TPU_VM, SLURM])
def test_help(script, stubs):
  result = run_script(script, ["-h"], base_env(stubs))
  assert result.returncode == 0
  assert result.stdout.startswith("Usage:")
  assert calls(stubs) == []


def test_tpu_dry_run_creates_a_missing_vm_and_runs_nothing(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="missing")
  result = run_script(TPU_VM, TPU_ARGS + ["--dry_run", "--"] + OVERRIDES, env)
  assert result.returncode == 0, result.stderr
  assert "does not exist: creating it" in result.stderr
  # Only the read-only describe reached gcloud.
  assert calls(stubs) == [
    ["compute", "tpus", "tpu-vm", "describe", "ega-pod"]
    + GCLOUD_FLAGS
    + ["--format=value(state,acceleratorType)"]
  ]

  commands = printed_commands(result.stdout)
  assert commands[0] == (
    ["gcloud", "compute", "tpus", "tpu-vm", "create", "ega-pod"]
    + GCLOUD_FLAGS
    + ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  )
  # The local checkout is packed, copied to every worker and unpacked there.
  assert commands[1][:3] == ["git", "-C", REPO]
  scp = commands[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6:] == ["ega-pod:ega_jax_src.tar.gz"] + GCLOUD_FLAGS + ["--worker=all"]
  remote = [ssh_command(words) for words in commands[3:]]
  assert None not in remote
  unpack, install, teacher, train = remote
  assert "tar -xzf ega_jax_src.tar.gz -C ega_jax" in unpack
  assert "python3.11 -m venv .venv" in install
  assert ".venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'" in install
  assert teacher == (
    "cd ega_jax && mkdir -p teachers/clip_vit_b32 && gcloud storage rsync "
    "--recursive gs://bucket/teachers/clip_vit_b32 teachers/clip_vit_b32"
  )
  assert_trains_on_all_workers(train)
  for command in remote:  # every remote command is valid shell
    assert subprocess.run([BASH, "-n", "-c", command]).returncode == 0, command


def test_tpu_dry_run_reuses_an_existing_vm(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="READY\tv4-32")
  result = run_script(
    TPU_VM, TPU_ARGS + ["--log=runs/my run.log", "--dry_run", "--"] + OVERRIDES, env
  )
  assert result.returncode == 0, result.stderr
  assert "exists (v4-32, READY): reusing it" in result.stderr
  commands = printed_commands(result.stdout)
  assert not any(
    words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] for words in commands
  )
  assert commands[-1][-5:] == ["2>&1", "|", "tee", "-a", "runs/my run.log"]
  assert_trains_on_all_workers(ssh_command(commands[-1][:-5]))
  assert len(calls(stubs)) == 1


def test_tpu_existing_vm_without_accelerator_flag_is_reused(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="READY\tv5litepod-16")
  result = run_script(TPU_VM, ["--name=n", "--zone=z", "--workdir=gs://b/r", "--dry_run"], env)
  assert result.returncode == 0, result.stderr
  assert "exists (v5litepod-16, READY)" in result.stderr


@pytest.mark.parametrize(
  "describe, message",
  [
    ("READY\tv4-8", "exists with accelerator v4-8, not v4-32"),
    ("PREEMPTED\tv4-32", "is PREEMPTED, not READY"),
  ],
)
def test_tpu_refuses_a_vm_it_cannot_use(stubs, describe, message):
  env = base_env(stubs, FAKE_TPU_DESCRIBE=describe)
  result = run_script(TPU_VM, TPU_ARGS + ["--dry_run"], env)
  assert result.returncode == 2
  assert result.stderr.strip().split("\n")[-1].startswith("tpu_vm.sh: error: ")
  assert message in result.stderr
  assert result.stdout == ""  # nothing planned, in particular no create


def test_tpu_describe_failure_stops_a_real_run_but_not_a_dry_run(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="denied")
  result = run_script(TPU_VM, TPU_ARGS, env)
  assert result.returncode == 2
  assert result.stderr.strip().split("\n")[-1] == (
    "tpu_vm.sh: error: could not describe TPU VM ega-pod: ERROR: "
    "(gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED: Permission 'tpu.nodes.get' denied"
  )
  assert [args[3] for args in calls(stubs)] == ["describe"]  # nothing created
  result = run_script(TPU_VM, TPU_ARGS + ["--dry_run"], env)
  assert result.returncode == 0, result.stderr
  assert "describe failed (see above): assuming TPU VM ega-pod does not exist" in result.stderr
  assert printed_commands(result.stdout)[0][4] == "create"


def test_tpu_dry_run_needs_no_gcloud(stubs, tmp_path):
  # A PATH with the tools the script needs, but no gcloud.
  tools = tmp_path / "tools"
  tools.mkdir()
  for tool in ("dirname", "basename", "mktemp", "rm", "grep", "tail", "cat"):
    os.symlink(shutil.which(tool), tools / tool)
  env = base_env(stubs, path=str(tools))
  result = run_script(TPU_VM, TPU_ARGS + ["--dry_run", "--"] + OVERRIDES, env)
  assert result.returncode == 0, result.stderr
  assert "gcloud not on PATH: assuming TPU VM ega-pod does not exist" in result.stderr
  commands = printed_commands(result.stdout)
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert commands[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ega-pod"]
  assert_trains_on_all_workers(ssh_command(commands[-1]))


@pytest.mark.parametrize(
  "drop, message",
  [
    ("--name", "--name (or TPU_NAME) is required"),
    ("--zone", "--zone (or ZONE) is required"),
    ("--workdir", "--workdir (or WORKDIR) is required"),
    ("--accelerator", "does not exist; pass --accelerator"),
  ],
)
def test_tpu_missing_values_are_one_line_errors(stubs, drop, message):
  args = ["--name=n", "--zone=z", "--workdir=w", "--accelerator=v4-8", "--dry_run"]
  args = [a for a in args if not a.startswith(drop + "=")]
  result = run_script(TPU_VM, args, base_env(stubs, FAKE_TPU_DESCRIBE="missing"))
  assert result.returncode == 2
  last_line = result.stderr.strip().split("\n")[-1]
  assert last_line.startswith("tpu_vm.sh: error: ") and message in last_line


def test_tpu_bad_arguments(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="missing")
  result = run_script(TPU_VM, ["--name=n", "--zone=z", "--workdir=w", "--config.seed=1"], env)
  assert result.returncode == 2
  assert "unknown option '--config.seed'" in result.stderr and "after --" in result.stderr
  result = run_script(TPU_VM, ["--name=n", "--zone=z", "--workdir=w", "--", "seed=1"], env)
  assert result.returncode == 2 and "'seed=1' after -- is not a flag" in result.stderr
  result = run_script(TPU_VM, ["--name=n", "--zone"], env)
  assert result.returncode == 2 and "--zone needs a value" in result.stderr
  result = run_script(
    TPU_VM, ["--name=n", "--zone=z", "--workdir=w", "--accelerator=v9-8", "--dry_run"], env
  )
  assert result.returncode == 2 and "pass --version" in result.stderr


def test_tpu_options_from_environment_and_git_clone(stubs):
  env = base_env(
    stubs,
    FAKE_TPU_DESCRIBE="missing",
    TPU_NAME="env-tpu",
    ZONE="europe-west4-a",
    ACCELERATOR_TYPE="v5litepod-16",
    WORKDIR="gs://b/run",
    DRY_RUN="1",
    REPO_URL="https://github.com/someone/ega_jax.git",
    REPO_REF="v1.0",
    REPO_DIR="~/code/ega",
    CONFIG="configs/stl10.py",
  )
  result = run_script(TPU_VM, ["--spot"], env)
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  assert commands[0] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "env-tpu",
    "--zone=europe-west4-a",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--spot",
  ]
  assert not any(words[0] == "git" or "scp" in words for words in commands)
  fetch = ssh_command(commands[1])
  assert "git clone --quiet https://github.com/someone/ega_jax.git code/ega" in fetch
  assert "git -C code/ega checkout --quiet --detach origin/v1.0" in fetch
  assert subprocess.run([BASH, "-n", "-c", fetch]).returncode == 0
  assert ssh_command(commands[2]).startswith("cd code/ega && ")  # install
  assert_trains_on_all_workers(
    ssh_command(commands[-1]),
    repo_dir="code/ega",
    train_argv=[
      ".venv/bin/python",
      "-m",
      "ega_jax.main",
      "--config=configs/stl10.py",
      "--workdir=gs://b/run",
    ],
  )


def test_tpu_skip_setup_only_trains(stubs):
  env = base_env(stubs, FAKE_TPU_DESCRIBE="READY\tv4-32")
  result = run_script(TPU_VM, TPU_ARGS + ["--skip_setup", "--dry_run", "--"] + OVERRIDES, env)
  assert result.returncode == 0, result.stderr
  (train,) = printed_commands(result.stdout)
  assert_trains_on_all_workers(ssh_command(train))


def test_tpu_real_run_ships_the_checkout_and_streams_to_the_log(stubs):
  log_file = stubs["dir"] / "train.log"
  env = base_env(stubs, FAKE_TPU_DESCRIBE="missing")
  result = run_script(TPU_VM, TPU_ARGS + ["--log", str(log_file), "--"] + OVERRIDES, env)
  assert result.returncode == 0, result.stderr
  recorded = calls(stubs)
  verbs = [args[3] for args in recorded]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh"]
  assert all("--worker=all" in args for args in recorded[2:])
  assert_trains_on_all_workers(ssh_command(["gcloud"] + recorded[-1]))
  # The training output streamed back and was also appended to --log.
  assert "worker output of ega-pod" in result.stdout
  assert "worker output of ega-pod" in log_file.read_text()
  # The shipped tarball is the checkout as git sees it: code yes, .venv no.
  with tarfile.open(stubs["dir"] / "shipped.tar.gz") as tar:
    names = set(tar.getnames())
  # configs/ is a link to ega_jax/configs/ (the tarball keeps it a link).
  assert {"ega_jax/main.py", "launch/tpu_vm.sh", "requirements.txt", "configs"} <= names
  assert "ega_jax/configs/cifar100.py" in names
  assert not any(n.startswith(".venv") or n.startswith(".git/") for n in names)
  # Temporary files are gone.
  assert sorted(os.listdir(stubs["dir"])) == ["bin", "calls.jsonl", "shipped.tar.gz", "train.log"]


# --- slurm_gpu.sbatch ------------------------------------------------------------


def slurm_env(stubs, **extra):
  values = dict(
    WORKDIR="/shared/runs/ega",
    CONFIG="configs/cifar100.py",
    TEACHER="/shared/teachers/clip_vit_b32",
    DATA_DIR="/shared/tfds",
    EXTRA_ARGS="--config.seed=3 --config.batch_size=512",
    REPO_DIR="/shared/ega_jax",
    SLURM_JOB_ID="4242",
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_NTASKS="16",
    SLURM_NTASKS_PER_NODE="8",
    SLURM_GPUS_ON_NODE="8",
    FAKE_HOSTS="gpu07,gpu08",
  )
  values.update(extra)
  return base_env(stubs, **{k: v for k, v in values.items() if v is not None})


SLURM_TRAIN = [
  "-m",
  "ega_jax.main",
  "--config=configs/cifar100.py",
  "--workdir=/shared/runs/ega",
  "--config.dataset.data_dir=/shared/tfds",
  "--config.teacher.checkpoint=/shared/teachers/clip_vit_b32",
  "--config.seed=3",
  "--config.batch_size=512",
  "--config.distill.method=rkd",
]


def slurm_printed(stdout):
  """The dry run's commands: one per line, except srun's, which runs to the end
  (its per-task script spans several lines inside quotes)."""
  before, srun_line, rest = stdout.partition("srun ")
  return [shlex.split(line) for line in before.strip().split("\n")] + [
    shlex.split(srun_line + rest)
  ]


def split_srun(words):
  """srun ... bash -c SCRIPT task PYTHON ARGS... -> (SCRIPT, PYTHON, ARGS)."""
  assert words[:2] == ["srun", "--kill-on-bad-exit=1"], words
  assert words[2:4] == ["bash", "-c"] and words[5] == "task", words
  return words[4], words[6], words[7:]


def test_slurm_dry_run_one_task_per_gpu(stubs):
  env = slurm_env(stubs, DRY_RUN="1")
  result = run_script(SLURM, ["--config.distill.method=rkd"], env)
  assert result.returncode == 0, result.stderr
  # Coordinator: first host of the expanded node list, port from the job id.
  assert "coordinator: gpu07:14242" in result.stderr
  assert "one task per GPU" in result.stderr
  assert calls(stubs) == [["scontrol", "show", "hostnames", "gpu[07-08]"]]
  lines = slurm_printed(result.stdout)
  assert len(lines) == 2
  assert lines[0] == ["cd", "/shared/ega_jax"]
  script, python, args = split_srun(lines[1])
  assert python == "/shared/ega_jax/.venv/bin/python"
  assert args == SLURM_TRAIN + ["--coordinator_address=gpu07:14242", "--num_processes=16"]
  assert '--process_id="$SLURM_PROCID"' in script
  assert subprocess.run([BASH, "-n", "-c", script]).returncode == 0


def test_slurm_dry_run_one_task_per_node_uses_all_gpus(stubs):
  env = slurm_env(
    stubs,
    DRY_RUN="1",
    SLURM_NTASKS="2",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_GPUS_ON_NODE=None,
    SLURM_GPUS_PER_NODE="a100:4",
    COORDINATOR_PORT="5555",
    EXTRA_ARGS=None,
    TEACHER=None,
    DATA_DIR=None,
  )
  result = run_script(SLURM, [], env)
  assert result.returncode == 0, result.stderr
  assert "one task per node, each using GPUs 0,1,2,3" in result.stderr
  lines = slurm_printed(result.stdout)
  assert lines[1] == ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  _, _, args = split_srun(lines[2])
  assert args == [
    "-m",
    "ega_jax.main",
    "--config=configs/cifar100.py",
    "--workdir=/shared/runs/ega",
    "--coordinator_address=gpu07:5555",
    "--num_processes=2",
  ]


def test_slurm_tasks_per_node_without_ntasks_per_node(stubs):
  # sbatch --ntasks=16 --nodes=2: only SLURM_TASKS_PER_NODE tells the layout.
  env = slurm_env(stubs, DRY_RUN="1", SLURM_NTASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="8(x2)")
  result = run_script(SLURM, [], env)
  assert result.returncode == 0, result.stderr
  assert "16 tasks on gpu[07-08], 8 per node" in result.stderr
  assert "one task per GPU" in result.stderr


def test_slurm_dry_run_outside_slurm_uses_documented_defaults(stubs, tmp_path):
  tools = tmp_path / "tools"  # no scontrol here
  tools.mkdir()
  os.symlink(shutil.which("seq"), tools / "seq")
  env = base_env(stubs, path=str(tools), DRY_RUN="1", WORKDIR="runs/x")
  result = subprocess.run(
    [BASH, SLURM], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=60
  )
  assert result.returncode == 0, result.stderr
  assert "coordinator: localhost:10000" in result.stderr
  _, python, args = split_srun(slurm_printed(result.stdout)[-1])
  assert python == str(tmp_path / ".venv" / "bin" / "python")
  assert args[-2:] == ["--coordinator_address=localhost:10000", "--num_processes=1"]
  # A plain comma list needs no scontrol; a bracketed one does.
  env.update(SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_NTASKS="2")
  result = run_script(SLURM, [], env)
  assert "coordinator: nodeA:10000" in result.stderr
  env.update(SLURM_JOB_NODELIST="node[1-2]")
  result = run_script(SLURM, [], env)
  assert result.returncode == 2
  assert "scontrol is needed to expand the node list 'node[1-2]'" in result.stderr


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(WORKDIR=None), "WORKDIR is required"),
    (dict(DRY_RUN=None, SLURM_JOB_ID=None), "not inside a SLURM job"),
    (dict(SLURM_NTASKS_PER_NODE="4"), "--ntasks-per-node=4 fits neither one task per GPU"),
  ],
)
def test_slurm_errors(stubs, changes, message):
  env = slurm_env(stubs, **dict(dict(DRY_RUN="1"), **changes))
  result = run_script(SLURM, [], env)
  assert result.returncode == 2
  assert result.stderr.startswith("slurm_gpu.sbatch: error: ")
  assert message in result.stderr


def test_slurm_arguments_must_be_flags(stubs):
  result = run_script(SLURM, ["seed=3"], slurm_env(stubs, DRY_RUN="1"))
  assert result.returncode == 2
  assert result.stderr.startswith("slurm_gpu.sbatch: error: 'seed=3' is not a flag")


@pytest.mark.parametrize(
  "visible, expected_gpus",
  [
    ("0,1,2,3", ["0", "1", "2", "3", "0", "1", "2", "3"]),  # tasks see the node's GPUs
    ("2", ["0"] * 8),  # SLURM bound each task to one GPU already
  ],
)
def test_slurm_real_run_gives_each_task_its_process_and_gpu(stubs, visible, expected_gpus):
  repo_dir = stubs["dir"] / "repo"
  tasks_dir = stubs["dir"] / "tasks"
  (repo_dir / ".venv" / "bin").mkdir(parents=True)
  tasks_dir.mkdir()
  write_executable(repo_dir / ".venv" / "bin" / "python", FAKE_PYTHON)
  env = slurm_env(
    stubs,
    REPO_DIR=None,
    SLURM_SUBMIT_DIR=str(repo_dir),
    SLURM_NTASKS="8",
    SLURM_NTASKS_PER_NODE="4",
    SLURM_GPUS_ON_NODE="4",
    CUDA_VISIBLE_DEVICES=visible,
    FAKE_TASKS=str(tasks_dir),
  )
  result = run_script(SLURM, ["--config.distill.method=rkd"], env)
  assert result.returncode == 0, result.stderr
  for process_id in range(8):
    with open(tasks_dir / f"{process_id}.json") as f:
      task = json.load(f)
    assert task["cwd"] == str(repo_dir)
    assert task["argv"] == SLURM_TRAIN + [
      "--coordinator_address=gpu07:14242",
      "--num_processes=8",
      f"--process_id={process_id}",
    ]
    assert task["JAX_LOCAL_DEVICE_IDS"] == expected_gpus[process_id]
