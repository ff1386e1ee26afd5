# OpenAI's Codex CLI from nixpkgs, reading the config.toml vmctl injects
# through fw_cfg: CODEX_HOME is the folder the contract puts it in (the
# local provider, Responses API, its own sandbox off: the guest is the
# boundary; docs/codex.md).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.vmctl.guest.codex;
  contract = config.vmctl.guest.contract;
  configFile =
    (lib.findFirst (f: f.name == contract.fw_cfg.prefix + "codex-config.toml")
      (throw "vmctl.guest.codex: guest-contract.json has no codex-config.toml fw_cfg entry")
      contract.fw_cfg.files
    ).dest;
  user = contract.user.name;
in
{
  imports = [ ./guest.nix ];

  options.vmctl.guest.codex = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Install Codex, configured by the config.toml vmctl injects.";
    };
    package = lib.mkPackageOption pkgs "codex" { };
  };

  config = lib.mkIf cfg.enable {
    vmctl.guest.features = [ "codex" ];
    vmctl.guest.agent.packages = [ cfg.package ];
    vmctl.guest.agent.environment.CODEX_HOME = dirOf configFile;
    # Codex writes its sessions and logs beside its config.
    systemd.tmpfiles.rules = [ "d ${dirOf configFile} 0755 ${user} ${user} -" ];
  };
}
