# Claude Code from nixpkgs, reading the settings vmctl injects through
# fw_cfg (its folder comes from the guest contract), fully offline.
# nixpkgs marks claude-code unfree: this module allows that one package by
# name and nothing else.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.vmctl.guest.claude;
  contract = config.vmctl.guest.contract;
  settingsFile =
    (lib.findFirst (f: f.name == contract.fw_cfg.prefix + "claude-settings.json")
      (throw "vmctl.guest.claude: guest-contract.json has no claude-settings.json fw_cfg entry")
      contract.fw_cfg.files
    ).dest;
in
{
  imports = [ ./guest.nix ];

  options.vmctl.guest.claude = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Install Claude Code, configured by the settings.json vmctl injects.";
    };
    package = lib.mkPackageOption pkgs "claude-code" { };
  };

  config = lib.mkIf cfg.enable {
    nixpkgs.config.allowUnfreePredicate = lib.mkDefault (
      pkg: builtins.elem (lib.getName pkg) [ "claude-code" ]
    );
    vmctl.guest.features = [ "claude" ];
    vmctl.guest.agent.packages = [
      cfg.package
      pkgs.bash # its Bash tool wants a real bash
      pkgs.ripgrep
    ];
    vmctl.guest.agent.environment = {
      CLAUDE_CONFIG_DIR = dirOf settingsFile;
      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1";
      DISABLE_AUTOUPDATER = "1";
      DISABLE_TELEMETRY = "1";
      USE_BUILTIN_RIPGREP = "0";
    };
  };
}
