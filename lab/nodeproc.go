package lab

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"syscall"
	"time"

	"github.com/nodemesh/nodemesh/lab/cgroup"
	"github.com/nodemesh/nodemesh/lab/workload"
)

var procNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,39}$`)

// StartNodeProcess starts argv inside a node's network namespace, in its
// own cgroup under the node's ProcessCgroup (not under the pods' parent,
// so programs attached there do not see it), detached so that it outlives
// this process. Its stdout and stderr go to a log file in the state
// directory. env is added to a minimal environment (PATH, HOME, and
// NODEMESH_NODE_NAME). The process is recorded in the lab state and killed
// by Down; ctx bounds only the start.
//
// Name is unique per node (1-40 of a-z, 0-9, '-'); starting a second
// process under a running name is an error.
func (l *Lab) StartNodeProcess(ctx context.Context, node, name string, argv, env []string) (Process, error) {
	if err := ctx.Err(); err != nil {
		return Process{}, err
	}
	if !procNameRE.MatchString(name) {
		return Process{}, fmt.Errorf("node process name %q: use 1-40 of a-z, 0-9 and '-'", name)
	}
	n, err := l.Node(node)
	if err != nil {
		return Process{}, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	unlock, err := lockDir(l.st.Dir)
	if err != nil {
		return Process{}, err
	}
	defer unlock()
	if fresh, err := loadState(l.st.Dir); err == nil && fresh.ID == l.st.ID {
		l.st.Processes = fresh.Processes
	}
	var kept []*Process
	for _, p := range l.st.Processes {
		if p.Node == node && p.Name == name {
			if !l.exited(p.Pid) {
				return Process{}, fmt.Errorf("node %s already runs a process named %q (pid %d)", node, name, p.Pid)
			}
			continue
		}
		kept = append(kept, p)
	}
	l.st.Processes = kept

	p := &Process{
		Node: node, Name: name, Argv: argv,
		Cgroup: filepath.Join(n.ProcessCgroup, name),
		Log:    filepath.Join(l.st.Dir, "logs", "node-"+node+"-"+name+".log"),
	}
	if err := cgroup.Create(p.Cgroup); err != nil {
		return Process{}, err
	}
	cmd, err := l.command(context.Background(), argv)
	if err != nil {
		return Process{}, fmt.Errorf("node process %s/%s: %w", node, name, err)
	}
	cmd.Env = append(cmd.Env, baseEnv()...)
	cmd.Env = append(cmd.Env, workload.EnvNodeName+"="+node)
	cmd.Env = append(cmd.Env, env...)
	logf, err := openLog(p.Log)
	if err != nil {
		return Process{}, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := spawn(cmd, n.Netns, p.Cgroup, true); err != nil {
		return Process{}, fmt.Errorf("node process %s/%s: %w", node, name, err)
	}
	p.Pid = cmd.Process.Pid
	l.track(cmd)
	l.st.Processes = append(l.st.Processes, p)
	if err := l.st.save(); err != nil {
		return Process{}, err
	}
	return *p, nil
}

// StopNodeProcess sends SIGTERM to a process started with
// StartNodeProcess, waits up to grace for it to exit, then kills whatever
// is left in its cgroup.
func (l *Lab) StopNodeProcess(ctx context.Context, node, name string, grace time.Duration) error {
	l.mu.Lock()
	var p *Process
	for _, q := range l.st.Processes {
		if q.Node == node && q.Name == name {
			p = q
		}
	}
	l.mu.Unlock()
	if p == nil {
		return fmt.Errorf("node %s runs no lab process named %q", node, name)
	}
	if !l.exited(p.Pid) {
		if err := syscall.Kill(p.Pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("stopping %s/%s: %w", node, name, err)
		}
		deadline := time.Now().Add(grace)
		for !l.exited(p.Pid) && time.Now().Before(deadline) {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	if err := cgroup.Remove(ctx, p.Cgroup); err != nil {
		return err
	}
	return nil
}

// Running reports whether a process started with StartNodeProcess is
// still running.
func (l *Lab) Running(p Process) bool { return !l.exited(p.Pid) }

// PodRunning reports whether a pod's command is still running. The lab
// does not restart commands that exit; their Pod objects stay Running.
func (l *Lab) PodRunning(p Pod) bool { return p.Pid > 0 && !l.exited(p.Pid) }
