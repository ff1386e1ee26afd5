# simonw's `llm` from nixpkgs, reading the model list vmctl injects through
# fw_cfg: LLM_USER_PATH is the folder the contract puts it in.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.vmctl.guest.llm;
  contract = config.vmctl.guest.contract;
  modelsFile =
    (lib.findFirst (f: f.name == contract.fw_cfg.prefix + "llm-models.yaml")
      (throw "vmctl.guest.llm: guest-contract.json has no llm-models.yaml fw_cfg entry")
      contract.fw_cfg.files
    ).dest;
in
{
  imports = [ ./guest.nix ];

  options.vmctl.guest.llm = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Install `llm`, configured by the model list vmctl injects.";
    };
    package = lib.mkPackageOption pkgs [ "python3Packages" "llm" ] { };
  };

  config = lib.mkIf cfg.enable {
    vmctl.guest.features = [ "llm" ];
    vmctl.guest.agent.packages = [ cfg.package ];
    vmctl.guest.agent.environment.LLM_USER_PATH = dirOf modelsFile;
  };
}
