package redirect

//go:generate go tool bpf2go -tags linux -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type orig_dst -type flow_key -type ip_key -type sock_key -type port_key -type pod_cfg -type config -type inbound_val -target bpfel capture bpf/capture.c
