{
  description = "vmctl: run coding agents against local models without trusting either";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      systems = linuxSystems ++ [
        "aarch64-darwin"
        "x86_64-darwin"
      ];
      forSystems = list: f: lib.genAttrs list (system: f nixpkgs.legacyPackages.${system});
      # The guest is Linux on the host's CPU, whatever the host's kernel.
      guestSystem = system: "${lib.head (lib.splitString "-" system)}-linux";

      mkAgent =
        {
          system,
          modules ? [ ],
        }:
        lib.nixosSystem {
          modules = [
            self.nixosModules.default
            { nixpkgs.hostPlatform = guestSystem system; }
          ]
          ++ modules;
        };

      pythonForTests =
        pkgs:
        pkgs.python3.withPackages (
          ps:
          self.packages.${pkgs.stdenv.hostPlatform.system}.vmctl.pythonDependencies
          ++ (with ps; [
            pytest
            pytest-asyncio # tests/test_gateway.py: async tests fail without it (pytest >= 8.4)
            pytest-timeout
            hypothesis
            import-linter # tests/test_layers.py: the import contracts in pyproject.toml
            openai
            anthropic
            llm
          ])
        );
    in
    {
      lib = { inherit mkAgent guestSystem; };

      nixosModules = {
        guest = ./nixos-modules/guest.nix;
        opencode = ./nixos-modules/opencode.nix;
        claude = ./nixos-modules/claude.nix;
        codex = ./nixos-modules/codex.nix;
        llm = ./nixos-modules/llm.nix;
        default = ./nixos-modules/default.nix;
      };

      nixosConfigurations = lib.listToAttrs (
        map (system: lib.nameValuePair "agent-${system}" (mkAgent { inherit system; })) linuxSystems
      );

      packages = forSystems systems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          vmctl = pkgs.callPackage ./nix/package.nix { };
        in
        {
          inherit vmctl;
          default = vmctl;
        }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          # The image manifest (vmctl-image/1) vmctl reads; its closure is the image.
          agent-image = self.nixosConfigurations."agent-${system}".config.system.build.vmctlManifest;
        }
      );

      apps = forSystems systems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.vmctl;
          meta.description = "vmctl, the command-line tool";
        };
      });

      checks = forSystems linuxSystems (pkgs: {
        unit =
          pkgs.runCommand "vmctl-unit-tests"
            {
              nativeBuildInputs = [
                (pythonForTests pkgs)
                pkgs.cpio
                # tests/test_images.py runs `busybox sh`; only that name, so
                # busybox's applets do not shadow coreutils on PATH.
                (pkgs.writeShellScriptBin "busybox" ''exec ${lib.getExe' pkgs.busybox "busybox"} "$@"'')
              ];
              src = ./.; # the flake's source: git-tracked files only
            }
            ''
              cp -r $src src && chmod -R u+w src && cd src
              export HOME=$TMPDIR PYTHONPATH=$PWD/orchestrator
              python -m pytest -p no:cacheprovider -m "not qemu and not llama and not slow and not network"
              touch $out
            '';
        smoke = pkgs.testers.runNixOSTest (import ./nix/smoke-test.nix { inherit self; });
      });

      devShells = forSystems systems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.vmctl ];
          packages = [
            (pythonForTests pkgs)
            pkgs.ruff
            pkgs.mypy
            self.formatter.${pkgs.stdenv.hostPlatform.system}
          ]
          ++ self.packages.${pkgs.stdenv.hostPlatform.system}.vmctl.runtimePath;
        };
      });

      # nixfmt-rfc-style: the RFC 166 formatter, named `nixfmt` since 25.11.
      formatter = forSystems systems (pkgs: pkgs.nixfmt);
    };
}
