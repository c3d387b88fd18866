"""llama.cpp's server dialect: the routes its clients (llama.vscode, llama.vim) call."""
