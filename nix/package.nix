# vmctl, the Python application from pyproject.toml, with the programs it
# drives on its PATH: QEMU, llama.cpp's llama-server (Metal on Apple
# silicon) and, on Linux, bubblewrap and util-linux (`unshare`: QEMU runs in
# a user namespace, see docs/guest-contract.md "Whose files").
{
  lib,
  stdenv,
  python3Packages,
  makeWrapper,
  qemu,
  llama-cpp,
  bubblewrap,
  util-linux,
}:

let
  project = (lib.importTOML ../pyproject.toml).project;
  appleSilicon = stdenv.hostPlatform.isDarwin && stdenv.hostPlatform.isAarch64;
  llama = if appleSilicon then llama-cpp.override { metalSupport = true; } else llama-cpp;
  runtimePath = [
    qemu
    llama
  ]
  ++ lib.optionals stdenv.hostPlatform.isLinux [
    bubblewrap
    util-linux
  ];
  # pyproject.toml's [project] dependencies, by their nixpkgs names.
  pythonDependencies = with python3Packages; [
    typer
    rich
    jinja2
    pexpect
    qemu-qmp
    huggingface-hub
    gguf
    platformdirs
    aiohttp
    pyyaml
  ]
  # Imported by vmctl.models (huggingface_hub 2.x's HTTP client); optional here
  # so that a nixpkgs without it still evaluates.
  ++ lib.optional (python3Packages ? httpx2) python3Packages.httpx2;
in
python3Packages.buildPythonApplication {
  pname = project.name;
  inherit (project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../setup.py
      ../MANIFEST.in
      (lib.fileset.maybeMissing ../README.md)
      ../orchestrator
      ../host-profiles
    ];
  };

  build-system = [ python3Packages.setuptools ];
  nativeBuildInputs = [ makeWrapper ];
  dependencies = pythonDependencies;

  # setup.py copies host-profiles/ into the package, as for any wheel.
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath runtimePath)
  ];

  # The test suite runs as the flake's `checks.<system>.unit`.
  doCheck = false;
  pythonImportsCheck = [ "vmctl" ];

  passthru = { inherit runtimePath pythonDependencies; };

  meta = {
    description = project.description;
    license = lib.licenses.mit;
    mainProgram = "vmctl";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
