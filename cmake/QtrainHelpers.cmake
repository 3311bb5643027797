# Helpers shared by every folder's CMakeLists.txt.

# qtrain_add_test(NAME name SOURCES a.cc b.cc DEPS lib1 lib2 [LABELS l1 l2] [TIMEOUT s])
# Builds one GoogleTest binary into build/bin/tests and registers it with ctest.
function(qtrain_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_DEPS} qtrain_testing GTest::gtest GTest::gmock GTest::gtest_main)
  set_target_properties(${T_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin/tests)
  add_test(NAME ${T_NAME} COMMAND ${T_NAME})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  set_tests_properties(${T_NAME} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "unit;${T_LABELS}")
endfunction()

# qtrain_add_fuzzer(NAME name SOURCES a.cc DEPS lib1)
# Builds one libFuzzer target into build/bin/fuzz (only when QTRAIN_FUZZ=ON).
function(qtrain_add_fuzzer)
  cmake_parse_arguments(F "" "NAME" "SOURCES;DEPS" ${ARGN})
  add_executable(${F_NAME} ${F_SOURCES})
  target_link_libraries(${F_NAME} PRIVATE ${F_DEPS})
  target_compile_options(${F_NAME} PRIVATE -fsanitize=fuzzer)
  target_link_options(${F_NAME} PRIVATE -fsanitize=fuzzer)
  set_target_properties(${F_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin/fuzz)
endfunction()

# qtrain_add_gpu_test(NAME name SOURCES a.cc b.cu DEPS lib1 [LABELS l] [TIMEOUT s])
# A test that needs a CUDA device: labelled "gpu", and reported by ctest as skipped (not passed)
# when every case called QTRAIN_REQUIRE_GPU() on a machine without one.
function(qtrain_add_gpu_test)
  cmake_parse_arguments(G "" "NAME;TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if(NOT G_TIMEOUT)
    set(G_TIMEOUT 300)
  endif()
  qtrain_add_test(NAME ${G_NAME} SOURCES ${G_SOURCES} DEPS ${G_DEPS} qtrain_testing_cuda
                  LABELS gpu ${G_LABELS} TIMEOUT ${G_TIMEOUT})
  # gtest prints "[  SKIPPED ] N tests" only when something was skipped; "[  PASSED  ] 0 tests"
  # with skips means nothing ran.
  set_tests_properties(${G_NAME} PROPERTIES SKIP_REGULAR_EXPRESSION "\\[  PASSED  \\] 0 tests")
endfunction()
