# `checks.<linux>.smoke`: boot the agent guest the way vmctl boots it and
# check the guest contract from the outside.
#
# The node is the flake's guest (nixosModules.default) under nixpkgs' test
# VM; QEMU gets what vmctl gives it: the fw_cfg files rendered by vmctl's
# own renderer (`python -m vmctl.agents`), a 9p workspace, the exec ports,
# and model-only networking (restrict=on, one guestfwd to 10.0.2.2:8080)
# where a stand-in OpenAI server answers. Markers, paths and addresses all
# come from guest-contract.json.
{ self }:
{ hostPkgs, lib, ... }:

let
  contract = builtins.fromJSON (builtins.readFile ../orchestrator/vmctl/data/guest-contract.json);
  net = contract.network;
  ws = contract.workspace;
  # No vmctl.workspace= on this guest's command line: the default transport.
  wsFs = ws.transports.${ws.default_transport}.fstype;
  model = "smoke-model";
  baseUrl = "http://${net.model_host}:${toString net.model_port}/v1";

  expected =
    hostPkgs.runCommand "vmctl-expected-agent-files"
      {
        nativeBuildInputs = [ (hostPkgs.python3.withPackages (ps: [ ps.pyyaml ])) ];
        src = lib.fileset.toSource {
          root = ../orchestrator;
          fileset = ../orchestrator/vmctl;
        };
      }
      ''
        PYTHONPATH=$src python3 -m vmctl.agents --base-url ${baseUrl} --model ${model} --out $out
      '';

  standIn = hostPkgs.writeShellScript "openai-stand-in" ''
    exec ${hostPkgs.python3}/bin/python3 ${./openai-stand-in.py} ${model}
  '';

  # Every exec port the contract names (`<exec_port>.N`): the guest's exec
  # agent binds to all of them. The test speaks to port 0 over exec0.sock.
  execArgs = lib.concatMap (
    n:
    let
      i = toString n;
    in
    [
      ''-chardev socket,id=vmctlexec${i},path="$TMPDIR"/exec${i}.sock,server=on,wait=off''
      "-device virtserialport,bus=vmctlserial.0,chardev=vmctlexec${i},name=${contract.console.exec_port}.${i}"
    ]
  ) (lib.range 0 (contract.console.exec_sessions - 1));

  short = f: lib.removePrefix contract.fw_cfg.prefix f.name;
  fwCfgArgs = map (f: "-fw_cfg name=${f.name},file=${expected}/${short f}") contract.fw_cfg.files;
  filesPy = lib.concatMapStringsSep ",\n" (
    f: ''("${short f}", "${f.dest}", "${f.owner}", "${f.mode}")''
  ) contract.fw_cfg.files;
in
{
  name = "vmctl-smoke";
  # The guest sets nixpkgs.config (claude.nix allows the unfree claude-code
  # by name), so each node evaluates its own pkgs.
  node.pkgsReadOnly = false;

  nodes.agent =
    { pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];
      environment.systemPackages = [ pkgs.curl ];
      virtualisation = {
        diskImage = null; # tmpfs root, as vmctl boots it
        vlans = [ ];
        memorySize = 2048;
        qemu.networkingOptions = lib.mkForce [
          "-netdev user,id=vmctl,net=10.0.2.0/24,host=${net.slirp_host_when_restricted},restrict=on,guestfwd=tcp:${net.model_host}:${toString net.model_port}-cmd:${standIn}"
          "-device virtio-net-pci,netdev=vmctl"
        ];
        qemu.options = fwCfgArgs ++ [
          ''-virtfs local,path="$TMPDIR"/xchg,security_model=none,mount_tag=${ws.tag}''
          "-device virtio-serial-pci,id=vmctlserial"
        ]
        ++ execArgs;
      };
    };

  testScript = ''
    import json, os, socket

    FILES = [
    ${filesPy}
    ]
    xchg = agent.state_dir / "xchg"
    xchg.mkdir(parents=True, exist_ok=True)
    os.chmod(xchg, 0o777)  # the unprivileged guest user writes there

    agent.start()
    with subtest("ready marker"):
        agent.wait_for_console_text("${contract.console.boot_marker}")
        agent.wait_for_console_text("${contract.console.ready_marker}")
        agent.wait_for_unit("vmctl-ready.service")

    with subtest("workspace mount"):
        fs = agent.succeed("findmnt -rn -o FSTYPE,SOURCE ${ws.mountpoint}").split()
        assert fs == ["${wsFs}", "${ws.tag}"], fs
        opts = agent.succeed("findmnt -rn -o OPTIONS ${ws.mountpoint}").strip().split(",")
        assert "nosuid" in opts and "nodev" in opts, opts
        agent.succeed("su ${contract.user.name} -s /bin/sh -c 'echo hello > ${ws.mountpoint}/from-guest'")
        assert (xchg / "from-guest").read_text() == "hello\n"

    with subtest("exact agent files from fw_cfg"):
        for name, dest, owner, mode in FILES:
            agent.succeed(f"cmp ${expected}/{name} {dest}")
            got = agent.succeed(f"stat -c '%U %a' {dest}").strip()
            assert got == f"{owner} {int(mode, 8):o}", (dest, got)
        home_cfg = agent.succeed("stat -c %U ${contract.user.home}/.config").strip()
        assert home_cfg == "${contract.user.name}", home_cfg

    with subtest("exec channel runs as the agent user in the workspace"):
        # The framed protocol of docs/guest-contract.md ("Exec channel"), port 0.
        def frame(kind: bytes, payload: bytes = b"") -> bytes:
            return kind + len(payload).to_bytes(2, "big") + payload

        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(str(agent.state_dir / "exec0.sock"))
        cmd = b"id -un; pwd; printenv OPENCODE_CONFIG LLM_USER_PATH"
        s.sendall(frame(b"R", b"smoketest01") + frame(b"A", cmd) + frame(b"X", b"- 0 0 -") + frame(b"0"))
        begin = b"\x1eVMCTL-BEGIN smoketest01\n"
        buf = b""  # bytes; `out` further down is str (the driver type-checks this script)
        while begin not in buf:
            chunk = s.recv(4096)
            assert chunk, buf
            buf += chunk
        buf = buf.split(begin, 1)[1]
        stdout = b""
        status: int | None = None
        while status is None:
            while len(buf) < 3 or len(buf) < 3 + int.from_bytes(buf[1:3], "big"):
                chunk = s.recv(4096)
                assert chunk, buf
                buf += chunk
            end = 3 + int.from_bytes(buf[1:3], "big")
            kind, payload, buf = buf[:1], buf[3:end], buf[end:]
            if kind == b"1":
                stdout += payload
            elif kind == b"E":
                status = int(payload)
        s.close()
        text = stdout.decode()
        assert status == 0, (status, text)
        lines = text.splitlines()
        assert lines[0] == "${contract.user.name}", lines
        assert lines[1] == "${ws.mountpoint}", lines

    with subtest("the model endpoint, and nothing else, is reachable"):
        out = agent.succeed("su ${contract.user.name} -s /bin/sh -c 'curl -sf --max-time 30 ${baseUrl}/models'")
        assert [m["id"] for m in json.loads(out)["data"]] == ["${model}"], out
        agent.fail("curl -sf --max-time 5 http://${net.model_host}:${toString (net.model_port + 1)}/")
        models = agent.succeed("su -l ${contract.user.name} -c 'llm models'")
        assert "${model}" in models, models

    with subtest("poweroff marker on an ACPI power-button press, as vmctl stops guests"):
        agent.send_monitor_command("system_powerdown")
        agent.wait_for_console_text("${contract.console.poweroff_marker}")
        agent.wait_for_shutdown()
  '';
}
