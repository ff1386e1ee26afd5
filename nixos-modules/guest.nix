# The vmctl agent guest: a disposable NixOS that implements the guest
# contract (orchestrator/vmctl/data/guest-contract.json, read below: the
# user, console markers, 9p tags, fw_cfg files and kernel command-line keys
# come from that file only, never from copies here).
#
# vmctl boots it by direct kernel boot from the manifest this module
# builds (`system.build.vmctlManifest`): tmpfs root, the host's /nix/store
# shared read-only over 9p (as nixpkgs' qemu-vm module does), the workspace
# over 9p or virtio-fs (the host's choice), agent configuration through fw_cfg, commands through a
# virtio-serial port.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib) mkDefault mkOption types;

  cfg = config.vmctl.guest;
  contract = builtins.fromJSON (builtins.readFile ../orchestrator/vmctl/data/guest-contract.json);
  user = contract.user;
  cpu = pkgs.stdenv.hostPlatform.parsed.cpu.name;
  consoleDev =
    contract.console.log_device.${cpu}
      or (throw "vmctl.guest: no console device for ${cpu} in guest-contract.json");
  ws = contract.workspace;
  net = contract.network;
  cmdline = contract.kernel_cmdline;
  # One port per concurrent session: <exec_port>.0 .. .N-1.
  execPorts = map (n: "/dev/virtio-ports/${contract.console.exec_port}.${toString n}") (
    lib.range 0 (contract.console.exec_sessions - 1)
  );
  execDevices = map (p: "${utils.escapeSystemdPath p}.device") execPorts;
  # The session mux the agent script hands the ports to (C, shared with the micro image).
  execMux = pkgs.runCommandCC "vmctl-exec-mux" { } ''
    mkdir -p $out/bin
    $CC -O2 -Wall -o $out/bin/vmctl-exec-mux ${../orchestrator/vmctl/data/guest/vmctl-exec-mux.c}
  '';
  mirror = contract.mirror;
  mirrorPort = "/dev/virtio-ports/${mirror.port}";
  mirrorDevice = "${utils.escapeSystemdPath mirrorPort}.device";
  workspaceMount = "vmctl-workspace.service";
  guestIp = lib.splitString "/" net.guest_address;
  fwCfgDest =
    key:
    (lib.findFirst (f: f.name == contract.fw_cfg.prefix + key) (throw "vmctl.guest: no fw_cfg ${key}")
      contract.fw_cfg.files
    ).dest;
  envFile = fwCfgDest "env";
  execReady = "/run/vmctl-exec/ready";

  # Print a contract marker where the host reads it: the log console and
  # the kernel log.
  marker = name: ''
    echo ${lib.escapeShellArg name} > /dev/${consoleDev}
    echo ${lib.escapeShellArg "vmctl: ${name}"} > /dev/kmsg
  '';

  # `copy NAME DEST OWNER MODE`, one line per fw_cfg file of the contract.
  fwCfgCopies = lib.concatMapStrings (
    f: "copy ${lib.escapeShellArgs [ f.name f.dest f.owner f.mode ]}\n"
  ) contract.fw_cfg.files;

  manifest = {
    format = "vmctl-image/1";
    name = cfg.name;
    system = pkgs.stdenv.hostPlatform.system;
    kernel = "${config.system.build.kernel}/${config.system.boot.loader.kernelFile}";
    initrd = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";
    cmdline = toString (
      [ "init=${config.system.build.toplevel}/init" ] ++ config.boot.kernelParams
    );
    shares = [
      {
        tag = contract.store.tag;
        path = builtins.storeDir;
        readonly = true;
      }
    ];
    contract = contract.version;
    features = lib.unique cfg.features;
    # vmctl-workspace.service mounts each transport the contract defines.
    transports = builtins.attrNames ws.transports;
  };
in
{
  options.vmctl.guest = {
    contract = mkOption {
      type = types.attrs;
      readOnly = true;
      default = contract;
      defaultText = lib.literalMD "the parsed `guest-contract.json`";
      description = "The guest contract shared with vmctl's Python side (read-only).";
    };

    name = mkOption {
      type = types.strMatching "[a-z0-9][a-z0-9._-]*";
      default = "nixos-agent";
      description = "The image name written into the manifest (`name`).";
    };

    features = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "opencode" ];
      description = "Agents this image provides, listed in the manifest (`features`).";
    };

    rootSize = mkOption {
      type = types.str;
      default = "50%";
      example = "2G";
      description = "Size of the tmpfs root (the guest's only writable layer besides the workspace).";
    };

    storeMsize = mkOption {
      type = types.ints.positive;
      default = 262144;
      description = "9p msize, in bytes, for the read-only host /nix/store share.";
    };

    ssh.enable = mkOption {
      type = types.bool;
      default = false;
      description = "Run sshd in the guest. Off by default: vmctl drives the guest over the exec port.";
    };

    exec = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Run the vmctl exec agent on the `${contract.console.exec_port}` virtio-serial port.";
      };
      user = mkOption {
        type = types.str;
        default = user.name;
        defaultText = lib.literalExpression ''"${user.name}"'';
        description = "The user commands sent by `vmctl exec` run as.";
      };
    };

    mirror.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Report the guest's listening TCP ports on the `${mirror.port}` virtio-serial port, so
        vmctl mirrors them on the host's 127.0.0.1 (the host offers the port only when the guest
        has a network and `--no-mirror` is not given). Trusts eth0 in the firewall: under SLiRP
        the only inbound connections are the host's loopback forwards.
      '';
    };

    agent = {
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = "Environment for agent sessions: login shells and the exec agent.";
      };
      packages = mkOption {
        type = types.listOf types.package;
        default = [ ];
        description = "Packages on PATH for agent sessions: login shells and the exec agent.";
      };
    };
  };

  config = {
    assertions = [
      {
        assertion = config.networking.firewall.enable;
        message = "vmctl.guest: networking.firewall.enable must stay true in an agent guest.";
      }
      {
        assertion = lib.elem cfg.exec.user [
          "root"
          user.name
        ];
        message = "vmctl.guest.exec.user must be \"${user.name}\" or \"root\", not \"${cfg.exec.user}\".";
      }
      {
        assertion = cfg.ssh.enable || !config.services.openssh.enable;
        message = "services.openssh.enable is set: enable sshd with vmctl.guest.ssh.enable instead.";
      }
    ];

    # Direct kernel boot; the host's store over 9p; a throwaway root.
    boot.loader.grub.enable = false;
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_mmio"
    ]
    ++ ws.transports."9p".modules;
    boot.initrd.kernelModules = [ "virtio_console" ];
    boot.kernelModules = [ "qemu_fw_cfg" ];
    # As the micro image (vmctl/images/micro.py, CMDLINE): no crypto
    # self-tests (the slowest initcalls under TCG, and two that
    # cryptomgr.notests misses), and on x86 a TSC taken as reliable instead
    # of HPET reads that exit to QEMU, no delay calibration of the second
    # CPU (delays use the TSC) and no IO-APIC timer check, as KVM guests.
    # Not booted here.
    boot.kernelParams = [
      "console=${consoleDev}"
      "cryptomgr.notests"
      "initcall_blacklist=crypto_kdf108_init,blake2s_mod_init"
      # Unit status on the log console only for failed or slow units (stage 1
      # and 2): less serial output under TCG. The markers are echoed by units.
      "systemd.show_status=auto"
    ]
    ++ lib.optionals pkgs.stdenv.hostPlatform.isx86_64 [
      "tsc=reliable"
      "lpj=10400000"
      "no_timer_check"
    ];
    # No NTP client: the clock comes from the host (RTC, kvmclock), and most nets have no route.
    services.timesyncd.enable = mkDefault false;

    # Boot trim: nothing below is needed by the guest contract.
    # Stage 1 needs only the virtio and 9p modules listed above; the default
    # set adds SATA, NVMe, USB, HID and LVM's dm_mod for hardware no vmctl
    # guest has (a larger initrd to unpack under TCG).
    boot.initrd.includeDefaultModules = mkDefault false;
    # No block devices: no LVM or bcache udev rules and tools, stage 1 and 2.
    services.lvm.enable = mkDefault false;
    boot.bcache.enable = mkDefault false;
    # Idle here: oomd manages no slice unless told to, and logrotate (with its
    # config check at every boot) rotates wtmp/btmp on a throwaway root.
    systemd.oomd.enable = mkDefault false;
    services.logrotate.enable = mkDefault false;
    # The root is a tmpfs: a persistent journal would be flushed into RAM too.
    services.journald.storage = mkDefault "volatile";
    # A fresh /var makes ConditionNeedsUpdate true at every boot, so these ran
    # every time, ordered before sysinit.target (a journal catalog rebuild).
    systemd.services.systemd-journal-catalog-update.enable = mkDefault false;
    systemd.services.systemd-update-done.enable = mkDefault false;
    # No display: no autologin shell on the first VT. The log console's getty
    # comes from console= (systemd-getty-generator) and stays.
    systemd.services."autovt@tty1".enable = mkDefault false;
    systemd.services."getty@tty1".enable = mkDefault false;

    fileSystems."/" = {
      device = "tmpfs";
      fsType = "tmpfs";
      options = [
        "mode=0755"
        "size=${cfg.rootSize}"
      ];
    };
    fileSystems.${contract.store.mountpoint} = {
      device = contract.store.tag;
      fsType = "9p";
      neededForBoot = true;
      options = [
        "trans=virtio"
        "version=9p2000.L"
        "msize=${toString cfg.storeMsize}"
        "cache=loose"
        "ro"
      ];
    };
    fileSystems."/nix/store" = {
      device = contract.store.mountpoint;
      options = [ "bind" ];
      neededForBoot = true;
    };

    # The workspace is mounted by a unit rather than a `fileSystems` entry:
    # test VMs (qemu-vm.nix) replace `fileSystems` wholesale, the guest must
    # boot without it (`vmctl.workspace=0` or `none`), and its transport
    # (9p or virtio-fs, contract `workspace.transports`) is the host's
    # choice on the kernel command line; none given means the default.
    systemd.services.vmctl-workspace = {
      description = "vmctl: mount the workspace at ${ws.mountpoint}";
      wantedBy = [ "multi-user.target" ];
      before = [ "multi-user.target" ];
      unitConfig.DefaultDependencies = false;
      after = [ "local-fs.target" ];
      path = [
        pkgs.kmod
        pkgs.util-linux
        pkgs.coreutils
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        transport=${lib.escapeShellArg ws.default_transport}
        for arg in $(cat /proc/cmdline); do
          case $arg in ${cmdline.workspace}=*) transport=''${arg#*=} ;; esac
        done
        [ "$transport" = 1 ] && transport=9p
        mkdir -p ${lib.escapeShellArg ws.mountpoint}
        case $transport in
          0 | none) exit 0 ;;
        ${lib.concatMapStrings (
          name:
          let
            t = ws.transports.${name};
          in
          ''
            ${name})
              modprobe -a ${lib.escapeShellArgs t.modules}
              exec mount -t ${t.fstype} -o ${lib.escapeShellArg t.options} ${lib.escapeShellArg ws.tag} ${lib.escapeShellArg ws.mountpoint} ;;
          ''
        ) (builtins.attrNames ws.transports)}
          *) echo "vmctl: unknown workspace transport $transport" >&2; exit 1 ;;
        esac
      '';
    };

    users.mutableUsers = false;
    users.allowNoPasswordLogin = true; # nobody logs in: autologin and the exec port only
    users.groups.${user.name}.gid = user.gid;
    users.users.${user.name} = {
      isNormalUser = true;
      uid = user.uid;
      group = user.name;
      home = user.home;
      createHome = true;
    };
    services.getty.autologinUser = user.name;
    # `exit` at the log console: tell the host (a foreground `vmctl up` then
    # stops the guest; getty logs in anew otherwise). Only on that console,
    # not in `vmctl shell` sessions.
    programs.bash.logout = ''
      if [ "$(tty)" = /dev/${consoleDev} ]; then
        printf '\036%s\n' ${lib.escapeShellArg contract.console.console_exit_marker}
      fi
    '';

    # Static address; a route and DNS only with vmctl.net=full.
    networking.usePredictableInterfaceNames = false;
    networking.useDHCP = false;
    networking.interfaces.eth0.ipv4.addresses = [
      {
        address = lib.head guestIp;
        prefixLength = lib.toInt (lib.last guestIp);
      }
    ];
    networking.firewall.enable = true;
    networking.firewall.trustedInterfaces = lib.mkIf cfg.mirror.enable [ "eth0" ];
    services.openssh.enable = cfg.ssh.enable;

    systemd.services.vmctl-booted = {
      description = "vmctl: boot marker";
      wantedBy = [ "sysinit.target" ];
      after = [ "systemd-journald.service" ];
      unitConfig.DefaultDependencies = false;
      serviceConfig.Type = "oneshot";
      script = marker contract.console.boot_marker;
    };

    systemd.services.vmctl-cmdline = {
      description = "vmctl: apply ${cmdline.instance} and ${cmdline.net}";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-setup.service" ];
      path = [
        pkgs.iproute2
        pkgs.openresolv
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        for arg in $(cat /proc/cmdline); do
          case "$arg" in
            ${cmdline.instance}=*) instance=''${arg#*=} ;;
            ${cmdline.net}=*) net=''${arg#*=} ;;
          esac
        done
        case "''${instance:-}" in
          *[!a-z0-9._-]*|"") ;;
          *) echo "vmctl-$instance" > /proc/sys/kernel/hostname ;;
        esac
        if [ "''${net:-}" = full ]; then
          ip route replace default via ${net.model_host} dev eth0
          echo "nameserver ${net.dns or "10.0.2.3"}" | resolvconf -m 0 -a eth0.vmctl
        fi
      '';
    };

    # Where the host has no user namespace (macOS), the agent takes the host
    # user's ids from the kernel command line, as in the micro image
    # (docs/guest-contract.md, "Whose files"). Not built or booted here.
    systemd.services.vmctl-agent-ids = {
      description = "vmctl: give ${user.name} the ids in ${cmdline.uid} and ${cmdline.gid}";
      wantedBy = [ "multi-user.target" ];
      before = [
        "vmctl-fw-cfg.service"
        "vmctl-exec-agent.service"
        "nscd.service"
        "getty.target"
      ];
      unitConfig.DefaultDependencies = false;
      after = [ "local-fs.target" ];
      path = [
        pkgs.coreutils
        pkgs.gnused
        config.systemd.package
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        uid= gid=
        for arg in $(cat /proc/cmdline); do
          case "$arg" in
            ${cmdline.uid}=*) uid=''${arg#*=} ;;
            ${cmdline.gid}=*) gid=''${arg#*=} ;;
          esac
        done
        case "$uid" in ""|0|*[!0-9]*) uid=${toString user.uid} ;; esac
        case "$gid" in ""|0|*[!0-9]*) gid=${toString user.gid} ;; esac
        [ "$uid:$gid" = "${toString user.uid}:${toString user.gid}" ] && exit 0
        sed -i "s/^${user.name}:x:${toString user.uid}:${toString user.gid}:/${user.name}:x:$uid:$gid:/" /etc/passwd
        sed -i "s/^${user.name}:x:${toString user.gid}:/${user.name}:x:$gid:/" /etc/group
        chown -R "$uid:$gid" ${user.home}
        # The exec port's udev rule names the owner: resolve it again.
        udevadm control --reload || true
        udevadm trigger --subsystem-match=virtio-ports --action=add || true
      '';
    };

    systemd.services.vmctl-fw-cfg = {
      description = "vmctl: install the files injected through fw_cfg";
      wantedBy = [ "multi-user.target" ];
      after = [
        "systemd-modules-load.service"
        "systemd-tmpfiles-setup.service"
        "local-fs.target"
      ];
      path = [
        pkgs.coreutils
        pkgs.kmod
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        modprobe qemu_fw_cfg || true
        base=/sys/firmware/qemu_fw_cfg/by_name
        # Missing ancestors of DIR are created owned by OWNER.
        mkparents() {
          dir=$1 owner=$2 todo=
          while [ ! -d "$dir" ]; do todo="$dir $todo"; dir=$(dirname "$dir"); done
          for d in $todo; do install -d -o "$owner" -g "$(id -gn "$owner")" -m 0755 "$d"; done
        }
        copy() {
          src=$base/$1/raw
          if [ ! -r "$src" ]; then echo "vmctl: fw_cfg $1 not given"; return 0; fi
          mkparents "$(dirname "$2")" "$3"
          install -o "$3" -g "$(id -gn "$3")" -m "$4" "$src" "$2"
          echo "vmctl: $1 -> $2"
        }
        ${fwCfgCopies}
      '';
    };

    services.udev.extraRules = ''
      SUBSYSTEM=="virtio-ports", ATTR{name}=="${contract.console.exec_port}.[0-9]*", OWNER="${cfg.exec.user}", MODE="0600", TAG+="systemd"
      SUBSYSTEM=="virtio-ports", ATTR{name}=="${mirror.port}", MODE="0600", TAG+="systemd"
    '';

    # The agent script is shared with the micro image; it reads the env
    # file itself and the mux touches its ready file once the ports are open.
    systemd.services.vmctl-exec-agent = lib.mkIf cfg.exec.enable {
      description = "vmctl: exec agent on ${contract.console.exec_port}.*";
      wantedBy = [ "multi-user.target" ];
      bindsTo = execDevices;
      after = execDevices ++ [
        "vmctl-fw-cfg.service"
        workspaceMount
      ];
      path = [
        pkgs.coreutils
        pkgs.gnugrep
        pkgs.util-linux
        pkgs.bash
      ]
      ++ cfg.agent.packages;
      environment = cfg.agent.environment // {
        VMCTL_EXEC_MUX = "${execMux}/bin/vmctl-exec-mux";
      };
      serviceConfig = {
        User = cfg.exec.user;
        RuntimeDirectory = "vmctl-exec";
        ExecStart = "${pkgs.runtimeShell} ${../orchestrator/vmctl/data/guest/vmctl-exec-agent.sh} ${execReady} ${lib.concatStringsSep " " execPorts}";
        Restart = "always";
        RestartSec = 1;
      };
    };

    # Port mirroring: the same watcher script as the micro image, started
    # only when the host offers the port (the device appears).
    systemd.services.vmctl-ports = lib.mkIf cfg.mirror.enable {
      description = "vmctl: report listening TCP ports on ${mirrorPort}";
      wantedBy = [ mirrorDevice ];
      bindsTo = [ mirrorDevice ];
      after = [ mirrorDevice ];
      path = [ pkgs.coreutils ];
      serviceConfig = {
        ExecStart = "${pkgs.runtimeShell} ${../orchestrator/vmctl/data/guest/vmctl-ports-watch.sh} ${mirrorPort} ${mirror.poll_s} ${toString mirror.heartbeat_polls} ${toString mirror.max_ports}";
        Restart = "always";
        RestartSec = 1;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
      };
    };

    systemd.services.vmctl-ready = {
      description = "vmctl: ready marker";
      wantedBy = [ "multi-user.target" ];
      wants = [ workspaceMount ];
      after = [
        workspaceMount
        "vmctl-fw-cfg.service"
        "vmctl-cmdline.service"
      ]
      ++ lib.optional cfg.exec.enable "vmctl-exec-agent.service";
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      # The exec agent is up once it has opened its port (bounded wait).
      script = lib.optionalString cfg.exec.enable ''
        for _ in $(seq 1 600); do [ -e ${execReady} ] && break; sleep 0.1; done
        [ -e ${execReady} ] || echo "vmctl: exec agent not listening" > /dev/kmsg
      '' + marker contract.console.ready_marker;
    };

    # Stopped early in shutdown: the host learns the guest is going down.
    systemd.services.vmctl-poweroff = {
      description = "vmctl: poweroff marker";
      wantedBy = [ "multi-user.target" ];
      after = [ "vmctl-ready.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${pkgs.coreutils}/bin/true";
        ExecStop = "${pkgs.writeShellScript "vmctl-poweroff-marker" (marker contract.console.poweroff_marker)}";
      };
    };

    environment.sessionVariables = cfg.agent.environment;
    environment.systemPackages = cfg.agent.packages;
    environment.extraInit = ''
      if [ -r ${envFile} ]; then set -a; . ${envFile}; set +a; fi
    '';

    # A small closure: no docs, no X, no Nix daemon, no bootloader switching.
    documentation.enable = mkDefault false;
    documentation.man.enable = mkDefault false;
    documentation.nixos.enable = mkDefault false;
    environment.defaultPackages = mkDefault [ ];
    programs.command-not-found.enable = mkDefault false;
    fonts.fontconfig.enable = mkDefault false;
    services.xserver.enable = false;
    services.udisks2.enable = mkDefault false;
    boot.enableContainers = mkDefault false;
    nix.enable = mkDefault false;
    system.switch.enable = mkDefault false;
    system.stateVersion = mkDefault lib.trivial.release;

    system.build.vmctlManifest = pkgs.writeText "vmctl-manifest.json" (builtins.toJSON manifest);
  };
}
