# Injected with -DCMAKE_PROJECT_INCLUDE when vmctl builds llama.cpp: only
# llama-server (and what it links) is built, which halves a 2-core build.
# CMake includes this file after every project() call; act once, at the
# end of the top-level CMakeLists, when every target exists.
if(NOT VMCTL_SERVER_ONLY_HOOKED)
  set(VMCTL_SERVER_ONLY_HOOKED ON)

  function(vmctl_collect_targets dir out)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(sub IN LISTS subdirs)
      vmctl_collect_targets("${sub}" sub_targets)
      list(APPEND targets ${sub_targets})
    endforeach()
    set(${out} ${targets} PARENT_SCOPE)
  endfunction()

  function(vmctl_server_only)
    vmctl_collect_targets("${CMAKE_SOURCE_DIR}" all_targets)
    foreach(t IN LISTS all_targets)
      if(NOT t STREQUAL "llama-server")
        set_property(TARGET ${t} PROPERTY EXCLUDE_FROM_ALL ON)
      endif()
    endforeach()
    # Sources that refuse to share a unity translation unit: mtmd-helper*.cpp
    # (#error), and ggml-cpu's AMX kernels, which redefine the quant block
    # structs (built only where -march=native enables AMX).
    foreach(t IN LISTS all_targets)
      get_target_property(t_type ${t} TYPE)
      if(t_type STREQUAL "INTERFACE_LIBRARY")
        continue()
      endif()
      get_target_property(t_dir ${t} SOURCE_DIR)
      get_target_property(t_sources ${t} SOURCES)
      if(NOT t_sources)
        continue()
      endif()
      foreach(src IN LISTS t_sources)
        if(src MATCHES "mtmd-helper|/amx/|^amx/")
          if(NOT IS_ABSOLUTE "${src}")
            set(src "${t_dir}/${src}")
          endif()
          set_source_files_properties("${src}" DIRECTORY "${t_dir}"
            PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
        endif()
      endforeach()
    endforeach()
  endfunction()

  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL vmctl_server_only)
endif()
