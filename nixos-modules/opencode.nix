# opencode from nixpkgs, reading the opencode.json vmctl injects through
# fw_cfg (its destination comes from the guest contract), fully offline.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.vmctl.guest.opencode;
  contract = config.vmctl.guest.contract;
  configFile =
    (lib.findFirst (f: f.name == contract.fw_cfg.prefix + "opencode.json")
      (throw "vmctl.guest.opencode: guest-contract.json has no opencode.json fw_cfg entry")
      contract.fw_cfg.files
    ).dest;
  configDir = dirOf configFile;
  user = contract.user.name;
  # opencode starts a background `npm install @opencode-ai/plugin` into its
  # config folder unless it finds these; offline that only wastes time.
  pluginLock = pkgs.writeText "opencode-package-lock.json" (
    builtins.toJSON {
      lockfileVersion = 3;
      packages."".dependencies."@opencode-ai/plugin" = cfg.package.version;
    }
  );
in
{
  imports = [ ./guest.nix ];

  options.vmctl.guest.opencode = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Install opencode, configured by the opencode.json vmctl injects.";
    };
    package = lib.mkPackageOption pkgs "opencode" { };
  };

  config = lib.mkIf cfg.enable {
    vmctl.guest.features = [ "opencode" ];
    vmctl.guest.agent.packages = [
      cfg.package
      pkgs.ripgrep # else its grep/glob tools try to download one
    ];
    vmctl.guest.agent.environment = {
      OPENCODE_CONFIG = configFile;
      OPENCODE_DISABLE_MODELS_FETCH = "1";
      OPENCODE_DISABLE_AUTOUPDATE = "1";
      OPENCODE_DISABLE_LSP_DOWNLOAD = "1";
    };
    systemd.tmpfiles.rules = [
      "d ${dirOf configDir} 0755 ${user} ${user} -"
      "d ${configDir} 0755 ${user} ${user} -"
      "d ${configDir}/node_modules 0755 ${user} ${user} -"
      "C ${configDir}/package-lock.json - - - - ${pluginLock}"
      "z ${configDir}/package-lock.json 0644 ${user} ${user} -"
    ];
  };
}
