package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nodemesh/nodemesh/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Keys of the Secret holding the CA key material. tls.crt/tls.key/ca.crt
// is the shape cert-manager writes; bundle.pem (generated mode only) keeps
// every trusted root across restarts during a rotation.
const (
	SecretCert   = "tls.crt"
	SecretKey    = "tls.key"
	SecretCA     = "ca.crt"
	SecretBundle = "bundle.pem"
)

// ParseCerts decodes PEM CERTIFICATE blocks; it fails on anything else so a
// mangled file is reported, not half-read.
func ParseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for rest := bytes.TrimSpace(data); len(rest) > 0; rest = bytes.TrimSpace(rest) {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, errors.New("data after the last PEM block is not PEM")
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block of type %q where CERTIFICATE was expected", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificates")
	}
	return out, nil
}

// ParseKey decodes one PEM private key (PKCS#8, SEC1 "EC PRIVATE KEY" or
// PKCS#1 "RSA PRIVATE KEY").
func ParseKey(data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, errors.New("no PEM private key")
	}
	var k any
	var err error
	switch b.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("PEM block of type %q is not a private key", b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", b.Type, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("private key of type %T cannot sign", k)
	}
	return s, nil
}

func encodeKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encoding CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseSigner builds a Signer from cert-manager-shaped PEM: certPEM is the
// signing certificate optionally followed by its chain, caPEM (optional)
// the trust anchor(s). Without caPEM the chain must end at a self-signed
// root. It returns the signer and any further roots from caPEM to trust.
func ParseSigner(certPEM, keyPEM, caPEM []byte, now time.Time) (*Signer, []*x509.Certificate, error) {
	certs, err := ParseCerts(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", SecretCert, err)
	}
	key, err := ParseKey(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", SecretKey, err)
	}
	s := &Signer{Cert: certs[0], Key: key}
	var anchors []*x509.Certificate
	if len(bytes.TrimSpace(caPEM)) > 0 {
		if anchors, err = ParseCerts(caPEM); err != nil {
			return nil, nil, fmt.Errorf("reading %s: %w", SecretCA, err)
		}
	} else if last := certs[len(certs)-1]; isSelfSigned(last) {
		anchors = []*x509.Certificate{last}
	} else {
		return nil, nil, fmt.Errorf("no %s and %s does not end at a self-signed root: add the root CA certificate as %s", SecretCA, SecretCert, SecretCA)
	}
	for _, c := range certs[1:] {
		if !isSelfSigned(c) {
			s.Intermediates = append(s.Intermediates, c)
		}
	}
	var lastErr error
	for _, a := range anchors {
		s.Root = a
		if lastErr = s.Validate(now); lastErr == nil {
			var extra []*x509.Certificate
			for _, o := range anchors {
				if !o.Equal(a) {
					extra = append(extra, o)
				}
			}
			return s, extra, nil
		}
	}
	return nil, nil, fmt.Errorf("checking the provided CA: %w", lastErr)
}

func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

// LoadProvidedSigner reads a user-provided CA (e.g. written by
// cert-manager) from Secret namespace/name; it signs as an intermediate.
func LoadProvidedSigner(ctx context.Context, c kubernetes.Interface, namespace, name string, now time.Time) (*Signer, []*x509.Certificate, error) {
	sec, err := c.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("reading CA Secret %s/%s: %w", namespace, name, err)
	}
	s, extra, err := ParseSigner(sec.Data[SecretCert], sec.Data[SecretKey], sec.Data[SecretCA], now)
	if err != nil {
		return nil, nil, fmt.Errorf("CA Secret %s/%s: %w", namespace, name, err)
	}
	return s, extra, nil
}

// SecretStore persists a generated root (and, during a rotation, every
// trusted root) in a Secret the CA owns.
type SecretStore struct {
	Client          kubernetes.Interface
	Namespace, Name string
}

// Load returns the stored signer and trusted roots, or a nil signer when
// the Secret does not exist yet.
func (s SecretStore) Load(ctx context.Context, now time.Time) (*Signer, []*x509.Certificate, error) {
	sec, err := s.Client.CoreV1().Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading CA root Secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	signer, _, err := ParseSigner(sec.Data[SecretCert], sec.Data[SecretKey], nil, now)
	if err != nil {
		return nil, nil, fmt.Errorf("CA root Secret %s/%s: %w (delete it to generate a new root, which breaks trust until agents reload the bundle)", s.Namespace, s.Name, err)
	}
	var roots []*x509.Certificate
	if b := sec.Data[SecretBundle]; len(b) > 0 {
		if roots, err = ParseCerts(b); err != nil {
			return nil, nil, fmt.Errorf("CA root Secret %s/%s: %s: %w", s.Namespace, s.Name, SecretBundle, err)
		}
	}
	return signer, roots, nil
}

// Save writes signer and roots, creating the Secret if needed. Creation
// fails with an AlreadyExists error when another CA replica won the race.
func (s SecretStore) Save(ctx context.Context, signer *Signer, roots []*x509.Certificate) error {
	key, err := encodeKey(signer.Key)
	if err != nil {
		return err
	}
	certPEM := EncodeCerts(append([]*x509.Certificate{signer.Cert}, signer.Intermediates...))
	if !signer.Cert.Equal(signer.Root) {
		certPEM = append(certPEM, EncodeCerts([]*x509.Certificate{signer.Root})...)
	}
	data := map[string][]byte{SecretCert: certPEM, SecretKey: key, SecretBundle: EncodeCerts(roots)}
	secs := s.Client.CoreV1().Secrets(s.Namespace)
	cur, err := secs.Get(ctx, s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = secs.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "nodemesh"}},
			Type:       corev1.SecretTypeOpaque,
			Data:       data,
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("creating CA root Secret %s/%s: %w", s.Namespace, s.Name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading CA root Secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	cur.Data = data
	if _, err := secs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating CA root Secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// LoadOrCreateRoot returns the stored root signer, or generates a root and
// stores it. If another replica stored one first, that one is used.
func LoadOrCreateRoot(ctx context.Context, store SecretStore, td spiffeid.TrustDomain, rootTTL time.Duration, now time.Time) (*Signer, []*x509.Certificate, error) {
	signer, roots, err := store.Load(ctx, now)
	if err != nil || signer != nil {
		return signer, roots, err
	}
	signer, err = NewRootSigner(td, rootTTL, now)
	if err != nil {
		return nil, nil, err
	}
	err = store.Save(ctx, signer, []*x509.Certificate{signer.Root})
	if apierrors.IsAlreadyExists(err) {
		return store.Load(ctx, now)
	}
	if err != nil {
		return nil, nil, err
	}
	return signer, []*x509.Certificate{signer.Root}, nil
}

// PublishBundle writes roots as PEM into ConfigMap namespace/name under
// identity.BundleKey, creating it if needed; agents watch it.
func PublishBundle(ctx context.Context, c kubernetes.Interface, namespace, name string, roots []*x509.Certificate) error {
	pemData := string(EncodeCerts(roots))
	cms := c.CoreV1().ConfigMaps(namespace)
	cur, err := cms.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "nodemesh"}},
			Data:       map[string]string{identity.BundleKey: pemData},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("creating trust bundle ConfigMap %s/%s: %w", namespace, name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading trust bundle ConfigMap %s/%s: %w", namespace, name, err)
	}
	if cur.Data[identity.BundleKey] == pemData {
		return nil
	}
	if cur.Data == nil {
		cur.Data = map[string]string{}
	}
	cur.Data[identity.BundleKey] = pemData
	if _, err := cms.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating trust bundle ConfigMap %s/%s: %w", namespace, name, err)
	}
	return nil
}
