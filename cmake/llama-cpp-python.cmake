# Read by CMake after each project() call while llama-cpp-python builds (the Makefile passes
# it as CMAKE_PROJECT_INCLUDE). llama-cpp-python switches llama.cpp's `common` library on with
# FORCE, yet its Python package never loads libllama-common (4.7 MB, the slowest part of the
# build); switching it off again after llama.cpp's own project() leaves it out.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library: not loaded by llama-cpp-python" FORCE)
